#!/usr/bin/env bash
# Copies the code files of the official implementations that benchmarks/peers.py imports into
# DEST (default .carry/peers, git-ignored), one folder per release, at pinned commits; code only
# (no images, checkpoints or notebooks), about 0.8 MB in all. Their code never enters the
# repository's tracked files: HMAR is under NVIDIA's non-commercial licence, CASMAR has no licence.
#
#   scripts/extract_peers.sh [DEST]        # MIRRORS=/work/.mirror: bare git mirrors, OWNER+NAME/repo
#
# Each mirror is a bare clone of the official repository (the session tool `fetch` leaves them at
# $MIRRORS/OWNER+NAME/repo; `git clone --bare URL` gives the same). Takes a second; no network.
set -euo pipefail
DEST=${1:-.carry/peers}
MIRRORS=${MIRRORS:-/work/.mirror}

# folder  owner/name  commit  paths
RELEASES=(
  "hmar NVlabs/HMAR 595a9df03a9df8152c7b50d96204d76cdd6dc244 LICENSE dist.py models attn/__init__.py attn/block_sparse_attn_interface.py attn/block_sparse_attn_triton.py utils/__init__.py utils/amp_sc.py"
  "var FoundationVision/VAR 78b95394fc5896192e3a003e4b295f8ea743c48f LICENSE dist.py models utils/amp_sc.py"
  "mar LTH14/mar fe470ac24afbee924668d8c5c83e9fec60af3a73 LICENSE models diffusion"
  "casmar_v1 gcai98/CASMAR 0e8147e8b90c2d726365314f353c97a65f93a21d models diffusion"
  "casmar_v2 gcai98/CASMAR bbe577cc1ef026f475a0180a265cca354c9beea7 models diffusion"
)

for rel in "${RELEASES[@]}"; do
  read -r folder repo commit paths <<< "$rel"
  git_dir="$MIRRORS/${repo/\//+}/repo"
  if ! git --git-dir="$git_dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "extract_peers: $repo commit $commit not found in $git_dir (fetch the repository first)" >&2
    exit 2
  fi
  rm -rf "${DEST:?}/$folder"
  mkdir -p "$DEST/$folder"
  # shellcheck disable=SC2086  # paths is a word list
  # (a mirror may lack the blobs of large files it was not asked for: git names them, harmlessly)
  git --git-dir="$git_dir" archive "$commit" $paths 2> >(grep -v "^error: invalid object" >&2) \
    | tar -x -C "$DEST/$folder"
  find "$DEST/$folder" -name '__pycache__' -prune -exec rm -rf {} +
  echo "$repo $commit" > "$DEST/$folder/SOURCE"
  echo "$folder: $repo@${commit:0:7} ($(du -sh "$DEST/$folder" | cut -f1))"
done
du -sh "$DEST"
