"""Device-only wrapper: bench/bench_fullsize.py with the stand-in tokenizers read from
.dev/tok-* (the device has neither the SmolLM2 GGUF nor MiniLM package)."""
import runpy
import sys

from transformers import AutoTokenizer

from contraq import preset_check as pc

pc.lm_stand_in_tokenizer = lambda: AutoTokenizer.from_pretrained(".dev/tok-lm")
pc.nli_stand_in_tokenizer = lambda: AutoTokenizer.from_pretrained(".dev/tok-nli")
sys.argv = ["bench/bench_fullsize.py", *sys.argv[1:]]
runpy.run_path("bench/bench_fullsize.py", run_name="__main__")
