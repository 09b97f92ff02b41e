#!/usr/bin/env bash
# What a device call sends, and how to send less (docs/protocol.md, *What travels to the device*).
# A device call copies the tracked files, the untracked files git does not ignore and the carried
# paths, 64 MiB in all. The shipped checkpoints alone are ~58 MB, so a call that carries the
# Fashion-MNIST train split (22.6 MB) must leave a checkpoint it does not need behind:
#   scripts/device_tree.sh size [CARRY...]   bytes that would travel with these carries, vs 64 MiB
#   scripts/device_tree.sh aside PATH...     move tracked paths into .aside/ (git-ignored: not sent)
#   scripts/device_tree.sh back              move them back (run it right after the device call)
# While paths are aside, `git status` shows them deleted: commit nothing until `back` has run
# (`aside` refuses to start with staged changes, and `back` checks that git sees them again).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
ASIDE=.aside

tree_bytes() {  # tracked files present + untracked files git does not ignore
  { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
  size)
    shift
    t=$(tree_bytes); c=0
    for p in "$@"; do
      [ -e "$p" ] || { echo "carry $p: not found" >&2; exit 2; }
      c=$((c + $(du -sb "$p" | cut -f1)))
    done
    total=$((t + c))
    awk -v t=$t -v c=$c -v l=$LIMIT 'BEGIN { printf "tree %.1f MB + carry %.1f MB = %.1f MB of %.1f MB (64 MiB): %s\n", \
      t / 1e6, c / 1e6, (t + c) / 1e6, l / 1e6, (t + c <= l) ? "fits" : "TOO LARGE: aside a path" }'
    [ $total -le $LIMIT ] ;;
  aside)
    shift
    [ $# -gt 0 ] || { echo "aside: name the tracked paths to leave behind" >&2; exit 2; }
    if ! git diff --cached --quiet; then echo "aside: there are staged changes; commit them first" >&2; exit 2; fi
    grep -qx "/$ASIDE/" .git/info/exclude 2>/dev/null || echo "/$ASIDE/" >> .git/info/exclude
    for p in "$@"; do
      p=${p%/}
      [ -e "$p" ] || { echo "aside: $p not found" >&2; exit 2; }
      [ -n "$(git ls-files -- "$p")" ] || { echo "aside: $p is not tracked" >&2; exit 2; }
      mkdir -p "$ASIDE/$(dirname "$p")"; mv "$p" "$ASIDE/$p"; echo "aside: $p"
    done ;;
  back)
    [ -d $ASIDE ] || { echo "back: nothing aside"; exit 0; }
    for p in $(cd $ASIDE && find . -type f | sed 's#^\./##'); do
      mkdir -p "$(dirname "$p")"; mv "$ASIDE/$p" "$p"
    done
    find $ASIDE -depth -type d -empty -delete
    if git ls-files --deleted | grep -q .; then
      echo "back: git still sees deleted files:" >&2; git ls-files --deleted >&2; exit 1
    fi
    echo "back: every aside path restored" ;;
  *)
    sed -n 2,10p "$0"; exit 2 ;;
esac
