#!/usr/bin/env bash
# Fill .whl/ (in the project root; ignored by git through .whl/.gitignore) with the Python 3.12
# wheels the GPU machine lacks: the shared set (../shared/gpu/fetch-wheels.sh: Dask, dask-cuda,
# Faust, s3fs/boto, moto, the tansu broker ...) plus what this project needs beyond it.
# Versions follow requirements/constraints.txt (tests/unit/test_packaging.py checks that).
#
#   bash benchmarks/fetch_gpu_wheels.sh        # from the project root or any folder in it
#
# Then benchmarks/gpu_check.sh installs them on the GPU machine (see its header for the call).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=""
for candidate in "${VISIONSTREAM_SHARED_GPU:-}" "$root/../shared/gpu" "$(git rev-parse --path-format=absolute --git-common-dir)/../../shared/gpu"; do
  if [ -n "$candidate" ] && [ -f "$candidate/fetch-wheels.sh" ]; then shared=$candidate; break; fi
done
[ -n "$shared" ] || { echo "fetch_gpu_wheels: ../shared/gpu/fetch-wheels.sh not found (set VISIONSTREAM_SHARED_GPU)" >&2; exit 1; }

# The shared script writes into ./.whl and appends to ./.git/info/exclude, which is not a folder
# in a git worktree: run it in a scratch folder that has both, then take its wheels.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/.git/info"
(cd "$scratch" && bash "$shared/fetch-wheels.sh" >/dev/null)
rm -rf .whl
mkdir -p .whl
printf '*\n' > .whl/.gitignore  # the folder ignores itself, in a worktree as in a checkout
mv "$scratch"/.whl/*.whl .whl/

P="--platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none $P -d .whl \
  pydantic-settings==2.16.3 python-dotenv==1.2.4 prometheus-client==0.26.0 tenacity==9.2.1 \
  fsspec==2026.9.0 hypothesis==6.170.17 sortedcontainers==2.4.0 attrs==26.1.0 \
  2>&1 | grep -v '^WARNING: Location' || true

# one version of each package, or the install on the GPU machine stops
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "fetch_gpu_wheels: two versions of: $dupes" >&2; exit 1; }
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ (what travels must stay under 64 MiB)"
