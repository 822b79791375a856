"""Summarise every text file in a folder, then print a report: a batch example to copy and adapt.

    python scripts/summarize_folder.py NOTES_DIR --out summaries.jsonl [selfextend-local summarize options]

Re-running skips files already summarised with the same content and settings, so a cron job or an
interrupted run can simply be started again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PATTERNS = ("*.txt", "*.md", "*.html", "*.pdf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path, default=Path("summaries.jsonl"))
    args, extra = parser.parse_known_args()  # the rest goes to `selfextend-local summarize`

    files = sorted({p for pattern in PATTERNS for p in args.folder.rglob(pattern) if p.is_file()})
    if not files:
        print(f"no {', '.join(PATTERNS)} files under {args.folder}", file=sys.stderr)
        return 1
    extra = [a for a in extra if a != "--"]
    cmd = [sys.executable, "-m", "selfextend_local.cli", "summarize", *map(str, files), "--out", str(args.out), *extra]
    status = subprocess.run(cmd).returncode  # 1 when some file failed: the report shows which

    records = [json.loads(line) for line in args.out.read_text().splitlines()]
    wanted = {str(p) for p in files}
    records = [r for r in records if r["path"] in wanted]
    ok = [r for r in records if not r["error"]]
    print(f"\n{len(ok)} of {len(records)} files summarised; {sum(r['seconds'] for r in records):.1f} s in all\n")
    for r in records:
        head = f"{r['path']}  ({r.get('prompt_tokens', '?')} tokens, {r['seconds']:.1f} s"
        head += f", {r['parts']} parts)" if r.get("method") == "parts" else ")"
        print(head)
        print(f"  ERROR: {r['error']}" if r["error"] else "  " + r["summary"].replace("\n", " ")[:300])
    return status


if __name__ == "__main__":
    sys.exit(main())
