"""trickbag: the bag of tricks for training PyTorch image classifiers.

Each trick is a plain function (plus a thin class where PyTorch users expect one), usable
without trickbag's trainer. Import the submodule you need: ``trickbag.losses``,
``trickbag.optim``, ``trickbag.schedules``, ``trickbag.mixing``, ``trickbag.metrics`` ...
"""

__version__ = "0.1.0"
