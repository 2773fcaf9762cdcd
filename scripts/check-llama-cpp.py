"""Decodes a few tokens of a tiny random-init Llama through the llama.cpp just built, q8_0 and q4_K_M, in a
child process: a build that crashes on this CPU (as ggml's AMX kernels did on Intel Xeons: a general protection
fault at the first matrix product) fails `make install` with a clear message, instead of a lifecycle run or a
server later. scripts/build-llama-cpp.sh runs it after each build; about 20 s.

    python scripts/check-llama-cpp.py
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile

CHILD = """
import sys
from pathlib import Path

import torch

from llmops.candidate_folder import CandidateMeta, save_hf_candidate
from llmops.config import ModelConfig, QuantizeConfig
from llmops.generation.loading import load_generator
from llmops.generation.modeling import load_base_model, load_tokenizer
from llmops.quantize import quantize_candidate

root = Path(sys.argv[1])
shape = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
cfg = ModelConfig(random_init=shape, max_length=32)
tokenizer = load_tokenizer(cfg)
torch.manual_seed(0)
save_hf_candidate(load_base_model(cfg, "causal-lm", tokenizer), tokenizer,
                  CandidateMeta("student", [], 32, task="causal-lm"), root / "fp32")
for kind in ("gguf-q8_0", "gguf-q4_k_m"):
    folder = quantize_candidate(root / "fp32", kind, QuantizeConfig(skip_modules=[], max_loss=None), root / kind)
    generator = load_generator(folder)
    batch = generator.running_batch(1, positions=64)
    logits, _ = batch.admit([generator.encode("write a positive tweet about coachella")])
    for _ in range(3):
        logits = batch.step(logits.argmax(dim=-1).tolist())
    assert torch.isfinite(logits).all(), f"{kind}: llama.cpp returned non-finite logits"
    print(f"{kind}: decoded", flush=True)
"""


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="llmops-llama-cpp-check-") as scratch:
        done = subprocess.run([sys.executable, "-c", CHILD, scratch], capture_output=True, text=True, check=False)
    if done.returncode == 0:
        print("llama.cpp check: a tiny Llama decoded as q8_0 and q4_K_M")
        return 0
    if done.returncode < 0:
        what = f"died of {signal.Signals(-done.returncode).name}"
        hint = (
            "a crash inside llama.cpp on this CPU: look at `dmesg | tail` for the library and instruction, and try "
            "a portable build (GGML_NATIVE=OFF make install)"
        )
    else:
        what, hint = f"failed (exit {done.returncode})", "its output is above"
    sys.stderr.write(done.stdout[-2000:] + done.stderr[-4000:])
    sys.stderr.write(f"\nllama.cpp check: decoding a tiny Llama through the llama.cpp just built {what}: {hint}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
