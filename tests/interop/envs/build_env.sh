#!/usr/bin/env bash
# Build (or reuse) a cached consumer venv outside the repo: build_env.sh NAME -> prints the venv path.
# build_env.sh NAME --cached: print it only if it is already built and current, else exit 3 without building.
# NAME.txt next to this script lists one pip install step per line ("--no-deps PKG" lines included; leading
# VAR=value words set environment variables for that step only);
# torch is pinned to 2.13.0 (CPU) with a constraint file in every step. The venv is reused when its stamp
# (a hash of NAME.txt, this script and the Python version) matches, so CI pays for the build once per cache.
set -euo pipefail
name=${1:?usage: build_env.sh NAME}
here=$(cd "$(dirname "$0")" && pwd)
reqs=$here/$name.txt
[[ -f $reqs ]] || { echo "build_env.sh: no requirements file $reqs" >&2; exit 2; }
python=${QUANTKIT_ENV_PYTHON:-python3.11}
root=${QUANTKIT_ENV_CACHE:-$HOME/.cache/quantkit/envs}
venv=$root/$name
stamp=$( (cat "$reqs" "$0"; "$python" -VV) | sha256sum | cut -c1-16)
if [[ -f $venv/.quantkit-stamp && $(cat "$venv/.quantkit-stamp") == "$stamp" ]]; then
    echo "$venv"; exit 0
fi
[[ ${2:-} == --cached ]] && exit 3
mkdir -p "$root"
# Build beside the final path and swap it in, so an interrupted build never leaves a stamped half-venv.
tmp=$(mktemp -d "$root/.$name.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
{
    "$python" -m venv "$tmp/venv"
    constraint=$tmp/constraints-torch.txt
    echo "torch==2.13.0" > "$constraint"
    export PIP_CONSTRAINT=$constraint PIP_DISABLE_PIP_VERSION_CHECK=1
    pip=("$tmp/venv/bin/python" -m pip install --quiet)
    # torch first and alone; where it comes from (a CPU wheel index, a local wheel) is pip's configuration.
    "${pip[@]}" torch==2.13.0
    grep -v '^\s*\(#\|$\)' "$reqs" | while read -r -a args; do
        vars=()
        while [[ ${args[0]} =~ ^[A-Za-z_][A-Za-z0-9_]*=[^=] ]]; do vars+=("${args[0]}"); args=("${args[@]:1}"); done
        env "${vars[@]}" "${pip[@]}" "${args[@]}"
    done
} >&2
rm -rf "$venv"
mv "$tmp/venv" "$venv"
# A venv's scripts hard-code its path: rewrite the shebangs and activate scripts after the move.
grep -rlI --null "$tmp/venv" "$venv/bin" | xargs -0 -r sed -i "s#$tmp/venv#$venv#g"
echo "$stamp" > "$venv/.quantkit-stamp"
echo "$venv"
