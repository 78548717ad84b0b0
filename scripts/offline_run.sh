#!/usr/bin/env bash
# On a node with Python, torch and CUDA but no package index: unpack an offline bundle
# (scripts/offline_bundle.py) into a fresh folder and run, from it alone,
#   tsgd-ray doctor -> OUT/doctor.log
#   benchmarks/gpu.py --quick (a, b, d, f and the calibration rows) -> OUT/gpu.log, OUT/gpu.json
#   tsgd-ray run default, every stage given the GPU, on the bundle's prepared output root -> OUT/run.log
# then OUT/summary.txt: each step's exit code and seconds, and the target lines. The bundle is
# unpacked into OUT/bundle (which must not exist yet): the run's output root, its MLflow database
# included, stays at OUT/bundle/outputs/default.
#
#   bash offline_run.sh BUNDLE.tar.xz OUT [--cpu] [key=value ...]
#
# --cpu: no GPU (the bundle's own test): gpu.py --dry, every stage on the CPU. The overrides go to
# the default run after the bundle's own. PYTHON names the interpreter (default python3). Exit code:
# the default run's (2 on a usage error).
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash offline_run.sh BUNDLE.tar.xz OUT [--cpu] [key=value ...]" >&2
    exit 2
fi
bundle=$1 out=$2
shift 2
gpu=1 device=cuda
if [ "${1:-}" = "--cpu" ]; then
    gpu=0 device=cpu
    shift
fi
[ -f "$bundle" ] || { echo "offline_run.sh: no bundle at $bundle" >&2; exit 2; }
py=${PYTHON:-python3}
mkdir -p "$out" && out=$(cd "$out" && pwd)
dir=$out/bundle
[ -e "$dir" ] && { echo "offline_run.sh: $dir exists: name a fresh OUT" >&2; exit 2; }
started=$(date +%s)
mkdir "$dir" && tar -xf "$bundle" -C "$dir" || { echo "offline_run.sh: cannot unpack $bundle" >&2; exit 2; }
ray_temp=$(mktemp -d "${TMPDIR:-/tmp}/tsgd-ray.XXXXXX")  # short: Ray's socket paths must stay under 108 bytes
export PYTHONPATH="$dir/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONNOUSERSITE=1 PYTHONUNBUFFERED=1
read -r -a prepared < <("$py" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["prepared_overrides"]))' "$dir/MANIFEST.json")
root=("storage.output_root=$dir/outputs/default" "ray.temp_dir=$ray_temp")
# every stage given the GPU (benchmarks/gpu.py's part g): whole GPUs for the teacher, the statistics
# probe and recovery, the students sharing it
stages=(teacher.gpus_per_worker=$gpu stats.gpus_per_actor=$gpu distill.gpus_per_actor=$gpu evaluate.gpus_per_worker=$gpu distill.cpus_per_actor=0.5)
summary=()

step() {  # step NAME LOG command...: run it, note its exit code and seconds
    local name=$1 log=$2 t0 rc
    shift 2
    t0=$(date +%s)
    "$@" >"$out/$log" 2>&1
    rc=$?
    summary+=("$name exit $rc in $(($(date +%s) - t0)) s")
    echo "${summary[-1]}"
    return $rc
}

cd "$dir" || exit 2
step doctor doctor.log "$py" -m tsgd_ray doctor default "${root[@]}" "${prepared[@]}" "${stages[@]}"
if [ $gpu = 1 ]; then
    step gpu.py gpu.log "$py" benchmarks/gpu.py --quick --skip-run --out "$out/gpu.json"
else
    step gpu.py gpu.log "$py" benchmarks/gpu.py --dry --quick --skip-run --out "$out/gpu.json"
fi
step run run.log "$py" -m tsgd_ray run default "${root[@]}" "${prepared[@]}" "${stages[@]}" "$@"
rc=$?
minutes=$(awk "BEGIN {printf \"%.1f\", ($(date +%s) - $started) / 60}")
{
    printf '%s\n' "${summary[@]}"
    grep -h "^target \|^ *target " "$out/gpu.log" "$out/run.log" 2>/dev/null | sed 's/^ *//'
    echo "target default_run_${device}_rc: $rc (goal == 0) $([ $rc = 0 ] && echo met || echo NOT met)"
    echo "target bundle_run_minutes: $minutes (goal <= 7) $(awk "BEGIN {print ($minutes <= 7) ? \"met\" : \"NOT met\"}")"
} >"$out/summary.txt"
cat "$out/summary.txt"
rm -rf "$ray_temp"
exit $rc
