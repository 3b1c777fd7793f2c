"""``trickbag cache``: where the decoded-image cache is, what it holds, and clearing it."""

from __future__ import annotations

import argparse
import time

EPILOG = """examples:
  trickbag cache                          location, entries (dataset, size, last use) and the total
  trickbag cache clear                    remove every entry
  trickbag cache clear --older-than 7     remove entries no run has used for 7 days
  trickbag cache --cache-dir /scratch/c   another cache folder (as data.cache_dir=/scratch/c)

The folder is, first that is set: --cache-dir, $TRICKBAG_CACHE_DIR, $XDG_CACHE_HOME/trickbag, ~/.cache/trickbag.
Entries unused for 30 days are removed automatically, and the least recently used ones once the cache passes
20 GB; an entry is decoded again the next time its dataset is loaded.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="show or clear the decoded-image cache",
        description="Show the decoded-image cache (location, entries, sizes, last use) or clear it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cache-dir", help="the cache folder (default: see below)")
    actions = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    clear = actions.add_parser(
        "clear",
        help="remove cache entries",
        description="Remove every cache entry, or those unused for more than --older-than days.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    clear.add_argument("--older-than", type=float, metavar="DAYS", help="only entries unused for DAYS days")
    clear.add_argument("--cache-dir", help=argparse.SUPPRESS)
    show = actions.add_parser("show", help="location, entries, sizes, last use (the default)")
    show.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.set_defaults(func=handle_show)
    show.set_defaults(func=handle_show)
    clear.set_defaults(func=handle_clear)


def _ago(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def handle_show(args) -> int:
    from trickbag import cache

    folder = cache.cache_folder(args.cache_dir)
    entries = cache.list_entries(folder)
    total = sum(entry.bytes for entry in entries)
    print(f"image cache: {folder}{'' if folder.is_dir() else ' (not created yet)'}")
    print(f"{len(entries)} entries, {cache.format_size(total)}")
    now = time.time()
    for entry in entries:
        print(
            f"  {entry.path.name}  {cache.format_size(entry.bytes):>9}  used {_ago(now - entry.last_used):>12}  {entry.source}"
        )
    return 0


def handle_clear(args) -> int:
    from trickbag import cache

    folder = cache.cache_folder(args.cache_dir)
    removed = cache.clear(folder, args.older_than)
    which = "" if args.older_than is None else f" unused for more than {args.older_than:g} days"
    print(f"removed {len(removed)} entries{which} from {folder}")
    return 0
