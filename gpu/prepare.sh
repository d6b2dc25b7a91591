#!/usr/bin/env bash
# Prepare the GPU check kit on a machine that reaches PyPI (the CPU machine): everything gpu/check.sh needs
# that the GPU machine lacks, in one folder to carry there (git-ignored; never commit it).
#
#   bash gpu/prepare.sh                              # -> .gpu-kit/, prints its size
#   bash gpu/prepare.sh --kit DIR --data PATH/tinyshakespeare.txt --python-version 3.12
# (defaults: .gpu-kit, ../shared/data/tinyshakespeare.txt beside the repository, 3.12: the GPU machine's Python)
#
# What goes in (docs/gpu.md):
#   wheels/   DeepSpeed built into a wheel here (pure Python; its ops are JIT-built where they run) and the
#             binary wheels of what it needs beyond the GPU image (gpu/kit-requirements.txt), for CPython
#             3.12 manylinux x86-64, plus the compiled ones again for this machine's Python (--cpu-dry-run)
#   sdists/   grouped_gemm, MegaBlocks and stanford-stk source archives, at requirements-megablocks.txt's
#             pins, built on the GPU machine against its torch and CUDA
#   data/     the Tiny Shakespeare text (the GPU machine sees nothing outside the repository)
#   kit.json  the pins, the target Python and every file's size and sha256 (check.sh verifies them)
# Environment: PYTHON (an interpreter with pip; default python3), PIP_INDEX_URL (default PyPI).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$REPO_ROOT/.gpu-kit"
DATA="$REPO_ROOT/../shared/data/tinyshakespeare.txt"
TARGET_PY=3.12
PYTHON=${PYTHON:-python3}
INDEX_URL=${PIP_INDEX_URL:-https://pypi.org/simple}
LIMIT_BYTES=$((64 * 1024 * 1024))

die() {
  echo "prepare.sh: error: $*" >&2
  exit 2
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-0}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --kit) KIT=${2:?--kit needs a folder}; shift 2 ;;
    --data) DATA=${2:?--data needs the path of tinyshakespeare.txt}; shift 2 ;;
    --python-version) TARGET_PY=${2:?--python-version needs X.Y}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "prepare.sh: error: unknown argument '$1'" >&2; usage 2 ;;
  esac
done

[[ "$TARGET_PY" =~ ^3\.[0-9]+$ ]] || die "--python-version must be X.Y (the GPU machine's Python, 3.12), got '$TARGET_PY'"
[ -f "$DATA" ] || die "the Tiny Shakespeare text '$DATA' does not exist; pass --data PATH/tinyshakespeare.txt"
"$PYTHON" -m pip --version > /dev/null 2>&1 \
  || die "'$PYTHON -m pip' does not run; set PYTHON to an interpreter with pip (e.g. the repository's .venv/bin/python)"
command -v curl > /dev/null || die "curl is not on PATH; it fetches the source archives from the package index"

# pin NAME FILE: the version FILE pins NAME to (a 'NAME==VERSION' line)
pin() {
  local version
  version=$(sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$2" | head -n 1)
  [ -n "$version" ] || die "no '$1==VERSION' line in $2"
  echo "$version"
}

DS_VERSION=$(pin deepspeed "$REPO_ROOT/requirements.txt")
MB_VERSION=$(pin megablocks "$REPO_ROOT/requirements-megablocks.txt")
GG_VERSION=$(pin grouped_gemm "$REPO_ROOT/requirements-megablocks.txt")
STK_VERSION=$(pin stanford-stk "$REPO_ROOT/requirements-megablocks.txt")
mapfile -t KIT_WHEELS < <(grep -E '^[A-Za-z0-9_.-]+==' "$REPO_ROOT/gpu/kit-requirements.txt")
HOST_PY=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

start=$SECONDS
rm -rf "$KIT"
mkdir -p "$KIT/wheels" "$KIT/sdists" "$KIT/data"

echo "[prepare] deepspeed==$DS_VERSION -> wheel (built here; its ops compile where they run)"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-binary deepspeed "deepspeed==$DS_VERSION" -w "$KIT/wheels" \
  || die "could not build the deepspeed==$DS_VERSION wheel (is PyPI reachable? see the pip output above)"

# wheels_for X.Y: binary wheels of gpu/kit-requirements.txt for CPython X.Y, manylinux x86-64
wheels_for() {
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" "${KIT_WHEELS[@]}" \
    || die "could not download the wheels of gpu/kit-requirements.txt for CPython $1 (see the pip output above)"
}
echo "[prepare] ${KIT_WHEELS[*]} -> wheels for CPython $TARGET_PY (the GPU machine)"
wheels_for "$TARGET_PY"
if [ "$HOST_PY" != "$TARGET_PY" ]; then
  echo "[prepare] the same for CPython $HOST_PY (this machine: gpu/check.sh --cpu-dry-run installs the kit here too)"
  wheels_for "$HOST_PY"
fi

# fetch_sdist NAME VERSION: the source archive from the index's JSON simple API (PEP 691), checked against the
# sha256 the index lists. Not `pip download`: pip must run an sdist's setup.py to read its metadata, and
# grouped_gemm's asks the GPU for its compute capability (and torch for CUDA_HOME) even for that.
fetch_sdist() {
  local name=$1 version=$2 project listing line url sha file
  project=$(echo "$name" | tr '[:upper:]' '[:lower:]' | sed 's/[._]/-/g')
  listing=$(curl -fsSL -H "Accept: application/vnd.pypi.simple.v1+json" "$INDEX_URL/$project/") \
    || die "could not read $INDEX_URL/$project/ (is the package index reachable?)"
  line=$(printf '%s' "$listing" | "$PYTHON" -c '
import json, sys
version, files = sys.argv[1], json.load(sys.stdin)["files"]
for f in files:
    n = f["filename"]
    if n.endswith(".tar.gz") and n.rsplit("-", 1)[-1] == version + ".tar.gz" and "sha256" in f.get("hashes", {}):
        print(f["url"], f["hashes"]["sha256"], n)
        break
' "$version") || die "could not parse the index's listing of $project"
  [ -n "$line" ] || die "the index lists no source archive (.tar.gz) of $name==$version"
  read -r url sha file <<< "$line"
  curl -fsSL -o "$KIT/sdists/$file" "$url" || die "could not download $url"
  echo "$sha  $KIT/sdists/$file" | sha256sum -c --quiet - \
    || die "$file does not match the sha256 the index lists ($sha): a broken or altered download"
  echo "[prepare]   $file ($(stat -c %s "$KIT/sdists/$file") bytes, sha256 ok)"
}
echo "[prepare] source archives: grouped_gemm==$GG_VERSION megablocks==$MB_VERSION stanford-stk==$STK_VERSION"
fetch_sdist grouped_gemm "$GG_VERSION"
fetch_sdist megablocks "$MB_VERSION"
fetch_sdist stanford-stk "$STK_VERSION"

cp "$DATA" "$KIT/data/tinyshakespeare.txt"

"$PYTHON" - "$KIT" "$TARGET_PY" "$DS_VERSION" "$MB_VERSION" "$GG_VERSION" "$STK_VERSION" << 'EOF'
import datetime, hashlib, json, sys
from pathlib import Path

kit, target_py, ds, mb, gg, stk = sys.argv[1:]
kit = Path(kit)
files = [{"path": str(p.relative_to(kit)), "bytes": p.stat().st_size,
          "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
         for p in sorted(kit.rglob("*")) if p.is_file() and p.name != "kit.json"]
manifest = {"prepared": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target_python": target_py,
            "pins": {"deepspeed": ds, "megablocks": mb, "grouped_gemm": gg, "stanford-stk": stk},
            "files": files}
(kit / "kit.json").write_text(json.dumps(manifest, indent=1) + "\n")
EOF

kit_bytes=$(find "$KIT" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
tree_bytes=$(cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2> /dev/null | tail -n 1 | cut -f1)
echo "[prepare] kit $KIT: $(find "$KIT" -type f | wc -l) files, $kit_bytes bytes ($((kit_bytes / 1024 / 1024)) MiB)," \
  "built in $((SECONDS - start)) s"
echo "[prepare] with the working tree ($tree_bytes bytes) that travels with it: $((kit_bytes + tree_bytes)) of $LIMIT_BYTES bytes (64 MiB)"
[ "$kit_bytes" -le "$LIMIT_BYTES" ] || die "the kit is $kit_bytes bytes, over the 64 MiB that can be carried"
if [ $((kit_bytes + tree_bytes)) -gt "$LIMIT_BYTES" ]; then
  echo "prepare.sh: warning: kit + working tree exceed 64 MiB; ignore or remove large untracked files before carrying it" >&2
fi
