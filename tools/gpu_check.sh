#!/usr/bin/env bash
# One command for a fresh GPU machine with this repository: install what is missing, then
# run every GPU check under time limits and write OUT_DIR/gpu_check.json + report.txt.
#
#   tools/gpu_check.sh OUT_DIR [--quick] [--budget SECONDS]
#
# Without internet, put wheels (webdataset, braceexpand, soundfile, nvidia-dali-cuda130,
# ...) in a folder and set AUDIOCLR_WHEELS=that/folder: they are installed from there.
set -u
cd "$(dirname "$0")/.."
out="${1:?usage: tools/gpu_check.sh OUT_DIR [--quick] [--budget SECONDS]}"
mkdir -p "$out"
missing=$(python3 - <<'PY'
import importlib.util
print(" ".join(m for m in ("webdataset", "soundfile", "yaml", "safetensors", "torchaudio")
                if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "[gpu_check] installing what is missing: $missing"
  if [ -n "${AUDIOCLR_WHEELS:-}" ]; then
    timeout 300 python3 -m pip install -q --no-index --no-deps --target /tmp/audioclr_site "$AUDIOCLR_WHEELS"/*.whl \
      > "$out/install.log" 2>&1 && export PYTHONPATH="/tmp/audioclr_site:${PYTHONPATH:-}"
  else
    timeout 600 python3 -m pip install -q -e '.[test]' > "$out/install.log" 2>&1
  fi || echo "[gpu_check] install failed (see $out/install.log); going on with what is there"
fi
shift
exec timeout 900 python3 tools/gpu_check.py "$out" "$@"
