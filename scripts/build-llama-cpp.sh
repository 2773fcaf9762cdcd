#!/usr/bin/env bash
# Builds the llama.cpp that the pinned llama-cpp-python source distribution vendors, into DEST (under the
# venv): `llama-quantize` and the shared libraries (bin/), the converter
# (src/convert_hf_to_gguf.py, src/gguf-py) and llama-cpp-python's own Python bindings over those libraries
# (python/llama_cpp). `make install` runs it; DEST/.built names the version and the build's options, and a
# finished build is reused while both are unchanged.
# With a fourth argument `peer` it builds `llama-server` alone, with llama.cpp's default options (OpenMP on), as
# its users get it (AMX aside, below): the LLM runtimes benchmark's peer (llmops itself does not need it).
#   scripts/build-llama-cpp.sh VERSION DEST PYTHON [peer]
set -euo pipefail
version=$1 dest=$2 python=$3 peer=${4:-}
# ggml's own thread pool, not OpenMP: llmops runs llama.cpp inside a Python process whose other threads (a
# warm-up, torch's own work) start OpenMP teams of their own; once a process manages more OpenMP threads than it
# has cores, libgomp stops spinning at its barriers. Measured on 2 cores, a 135M Llama (q8_0) at one sequence:
# OpenMP build 111-127 tokens/s through the engine, 63-70 after a warm-up on another thread; this build 86-111
# either way (llmops attaches a persistent ggml pool per context, as llama-server does).
options=(-DGGML_OPENMP=OFF)
targets=(llama llama-quantize)
if [ -n "$peer" ]; then
  options=() targets=(llama-server)
fi
# Tuned to this CPU (AVX2, AVX-512 and the like) unless GGML_NATIVE=OFF (the container image's portable option).
if [ "${GGML_NATIVE:-ON}" != ON ]; then
  options+=(-DGGML_NATIVE="$GGML_NATIVE")
fi
# Without ggml's AMX kernels, on every x86 CPU: on Intel Xeons that have AMX (Sapphire Rapids and later) the
# pinned llama.cpp's first matrix product stops the process with a general protection fault at `ldtilecfg`
# (measured on this project's Xeon VMs, llama-server alike; upstream llama.cpp#20824, #26954: the tile
# configuration is optimised away, and worker threads lack the kernel's AMX permission). AVX-512 stays on.
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' | c++ -x c++ -mno-amx-tile - -o /dev/null 2>/dev/null; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  options+=("-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx")
fi
stamp="$version ${options[*]} ${targets[*]}"
if [ -f "$dest/.built" ] && [ "$(cat "$dest/.built")" = "$stamp" ]; then
  exit 0
fi
command -v cmake >/dev/null || { echo "llama.cpp needs cmake (apt-get install cmake)" >&2; exit 1; }
command -v c++ >/dev/null || { echo "llama.cpp needs a C++ compiler (apt-get install g++)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary :all: --dest "$work" "llama-cpp-python==$version"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
rm -rf "$dest" && mkdir -p "$dest/python"
mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$dest/src"
mv "$work/llama_cpp_python-$version/llama_cpp" "$dest/python/llama_cpp"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
started=$(date +%s)
echo "building llama.cpp (llama-cpp-python $version) into $dest: minutes on a small machine, once per pin"
# Native: built on the machine that runs it (AVX2 and the like); no curl (models are local files).
cmake -S "$dest/src" -B "$dest/build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  "${options[@]}" -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  >"$dest/build.log"
cmake --build "$dest/build" --target "${targets[@]}" -j "$(nproc)" >>"$dest/build.log"
# Binaries and libraries are in build/bin (the binaries find the libraries there); the objects can go.
find "$dest/build" -mindepth 1 -maxdepth 1 ! -name bin -exec rm -rf {} +
echo "llama.cpp built in $(( $(date +%s) - started )) s"
echo "$stamp" >"$dest/.built"
# A tiny Llama decoded through the new build (scripts/check-llama-cpp.py): a build that crashes on this CPU fails
# here, and is built again by the next run, not reused. The container image copies this script alone: no check.
check="$(dirname "$0")/check-llama-cpp.py"
if [ -z "$peer" ] && [ -f "$check" ] && ! LLMOPS_LLAMA_CPP="$(cd "$dest" && pwd)" "$python" "$check"; then
  rm -f "$dest/.built"
  exit 1
fi
