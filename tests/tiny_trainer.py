"""Tiny real training runs for the tests that need processes of their own.

    python -m torch.distributed.run --nproc_per_node 2 -m tests.tiny_trainer ddp OUT
    python -m torch.distributed.run --nproc_per_node 2 -m tests.tiny_trainer sharded OUT
    python -m torch.distributed.run --nproc_per_node 2 -m tests.tiny_trainer zero3 OUT
    python -m tests.tiny_trainer slow OUT [SLEEP_S]

`ddp`: a 2-rank Trainer run with the callback; each rank writes `OUT/rank<r>.json` with the
structural metrics it computes alone from its own replica. `sharded`: FSDP1 / FSDP2
(`fully_shard`) snapshots against the unsharded numbers, and a rank-0-only snapshot failure
that must not hang the other rank; rank 0 writes `OUT/sharded.json`. `zero3`: DeepSpeed
ZeRO-3 on its CPU accelerator (gloo), a snapshot of the partitioned model against the
unsharded numbers; rank 0 writes `OUT/zero3.json`. `slow`: one process
training with a structural snapshot every step and a pause per step, until it is killed.
Run from the repository root (the tests put it on PYTHONPATH). Not collected by pytest.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB = 64


class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
    """Random token sequences; the label is whether token 1 is in the upper half."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, 8), generator=g)
        self.labels = (self.ids[:, 1] >= VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                "labels": self.labels[i]}  # fmt: skip


class PlainNet(torch.nn.Module):  # type: ignore[misc]
    """A two-layer net for plain-PyTorch loops: LoRA goes on `proj`."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(x)))


def tiny_model(seed: int = 0, random_b: bool = False) -> Any:
    """A 2-layer BERT classifier from a config with LoRA r=4 on query and value."""
    import peft

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=16, num_labels=2)  # fmt: skip
    base = transformers.BertForSequenceClassification(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(base, lora)
    if random_b:  # PEFT starts B at zero; a non-zero update gives the spectra something to show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
    return model


def tiny_trainer(out: Path, callbacks: list[Any], max_steps: int, **kw: Any) -> Any:
    opts: dict[str, Any] = {"per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2,
                            "save_strategy": "no", "report_to": "none", "use_cpu": True,
                            "disable_tqdm": True, "seed": 0}  # fmt: skip
    args = transformers.TrainingArguments(output_dir=str(out / "hf"), max_steps=max_steps, **(opts | kw))
    return transformers.Trainer(model=tiny_model(), args=args, train_dataset=Tokens(128, 0),
                                eval_dataset=Tokens(16, 2), callbacks=callbacks)  # fmt: skip


# -- ddp ---------------------------------------------------------------------------------


def ddp(out: Path) -> None:
    from gradience.integrations.snapshot import lora_modules, structural_metrics
    from gradience_hf import GradienceCallback

    cb = GradienceCallback(out / "log", structural_interval=2)
    trainer = tiny_trainer(out, [cb], max_steps=8, eval_strategy="steps", eval_steps=4)
    trainer.train()
    trainer.save_model(str(out / "peft"))  # the Trainer writes on the main process only
    rank = trainer.args.process_index
    _, modules = structural_metrics(lora_modules(trainer.model))  # this replica, alone
    result = {"rank": rank, "world_size": trainer.args.world_size, "modules": modules,
              "parallel_mode": str(trainer.args.parallel_mode)}  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(result))


# -- sharded -----------------------------------------------------------------------------


def _train_step(model: Any, batch: dict[str, Any]) -> None:
    model.eval()  # no dropout: every rank and the unsharded twin take the same step
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()


def _batch() -> dict[str, Any]:
    data = Tokens(8, 3)  # the same batch on every rank: sharded and unsharded steps agree
    return {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids), "labels": data.labels}


def _unsharded_reference() -> dict[str, Any]:
    from gradience.integrations.snapshot import take_snapshot

    model = tiny_model(random_b=True)
    _train_step(model, _batch())
    snap = take_snapshot(model)
    assert snap is not None
    return {"metrics": snap.metrics, "modules": snap.modules}


def _fsdp1(rank: int, nested: bool) -> dict[str, Any]:
    """FSDP1 on CPU; `nested` wraps each BertLayer and snapshots the unwrapped model,
    which is what the Trainer hands to callbacks."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from gradience.integrations.snapshot import take_snapshot

    inner = tiny_model(random_b=True)
    policy = ModuleWrapPolicy({transformers.models.bert.modeling_bert.BertLayer}) if nested else None
    wrapped = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy)
    _train_step(wrapped, _batch())
    snap = take_snapshot(inner if nested else wrapped, compute=rank == 0)
    return {} if snap is None else {"metrics": snap.metrics, "modules": snap.modules}


def _fsdp2(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    from gradience.integrations.snapshot import take_snapshot

    model = tiny_model(random_b=True)
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    _train_step(model, _batch())
    weight = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight
    snap = take_snapshot(model, compute=rank == 0)
    out = {"param_type": type(weight).__name__}
    return out if snap is None else {**out, "metrics": snap.metrics, "modules": snap.modules}


def _lora_grad_norms(rank: int) -> dict[str, Any]:
    """`lora_grad_norm` of an FSDP2 model (gradient shards summed over ranks) and of its unsharded twin."""
    from torch.distributed.fsdp import fully_shard

    from gradience.integrations.lora_grad import lora_grad_norm

    twin = tiny_model(random_b=True)
    twin.eval()
    twin(**_batch()).loss.backward()
    model = tiny_model(random_b=True)
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    model.eval()
    model(**_batch()).loss.backward()  # the same batch on every rank: the averaged gradients are the twin's
    grad = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight.grad
    return {"unsharded": lora_grad_norm(twin), "fsdp2": lora_grad_norm(model), "grad_type": type(grad).__name__}


def _rank0_failure_does_not_hang(rank: int, out: Path) -> dict[str, Any]:
    """Rank 0's snapshot computation always fails; snapshots get disabled on both ranks
    together, so the gathers (collectives) still pair up and training finishes."""
    import warnings

    from torch.distributed.fsdp import fully_shard

    from gradience.integrations import snapshot
    from gradience.integrations.recorder import Recorder

    model = tiny_model(random_b=True)
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    if rank == 0:
        def broken(*a: Any, **kw: Any) -> Any:
            raise RuntimeError("injected on rank 0")

        snapshot.structural_metrics = broken  # type: ignore[assignment]
    rec = Recorder(out / "hang-log", model, structural_interval=1, is_writer=rank == 0)
    rec.start()
    steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, 11):
            _train_step(model, _batch())
            rec.maybe_snapshot(step)
            steps = step
        rec.end(steps)
    return {"steps": steps, "errors": rec._errors}


def sharded(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    result: dict[str, Any] = {"world_size": dist.get_world_size(), "reference": _unsharded_reference()}
    for name, check in (("fsdp1_root", lambda: _fsdp1(rank, nested=False)),
                        ("fsdp1_nested_unwrapped", lambda: _fsdp1(rank, nested=True)),
                        ("fsdp2", lambda: _fsdp2(rank)),
                        ("lora_grad_norm", lambda: _lora_grad_norms(rank)),
                        ("rank0_failure", lambda: _rank0_failure_does_not_hang(rank, out))):  # fmt: skip
        try:
            result[name] = check()
        except Exception as exc:  # recorded, so the test can show the exact error
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        dist.barrier()
    if rank == 0:
        (out / "sharded.json").write_text(json.dumps(result))
    dist.destroy_process_group()


# -- zero3 -------------------------------------------------------------------------------


def zero3(out: Path) -> None:
    """One ZeRO-3 step of the tiny model on 2 CPU ranks, then a snapshot on every rank."""
    import deepspeed
    import torch.distributed as dist

    from gradience.integrations.distributed import is_sharded
    from gradience.integrations.snapshot import take_snapshot

    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    result: dict[str, Any] = {"world_size": dist.get_world_size(), "reference": _unsharded_reference(),
                              "accelerator": deepspeed.get_accelerator().device_name()}  # fmt: skip
    model = tiny_model(random_b=True)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              # threshold 0: else parameters this small stay whole ("persistent") on every rank
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "gradient_clipping": 0.0,
              "zero_allow_untested_optimizer": True}  # SGD: a torch optimizer, fine for one step  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.5), config=config)
    engine.module.eval()  # no dropout, as in the unsharded reference
    loss = engine(**_batch()).loss
    engine.backward(loss)
    engine.step()
    weight = engine.module.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"].weight
    # a partitioned parameter holds an empty tensor between gathers, and its shard in ds_tensor
    result["local_numel"], result["ds_numel"] = int(weight.data.numel()), int(weight.ds_numel)
    result["shard_numel"], result["ds_status"] = int(weight.ds_tensor.numel()), str(weight.ds_status)
    result["is_sharded"] = is_sharded(engine.module)
    snap = take_snapshot(engine.module, compute=rank == 0)
    if snap is not None:
        result |= {"metrics": snap.metrics, "modules": snap.modules}
    if rank == 0:
        (out / "zero3.json").write_text(json.dumps(result))
    dist.barrier()


# -- slow --------------------------------------------------------------------------------


def slow(out: Path, sleep_s: float) -> None:
    """Train for a long time, a snapshot every step, until someone kills the process."""
    from gradience_hf import GradienceCallback

    class Pause(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            time.sleep(sleep_s)

    cb = GradienceCallback(out / "log", structural_interval=1)
    tiny_trainer(out, [cb, Pause()], max_steps=100_000, logging_steps=1).train()


def main(argv: list[str]) -> None:
    mode, out = argv[0], Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if mode == "ddp":
        ddp(out)
    elif mode == "sharded":
        sharded(out)
    elif mode == "zero3":
        zero3(out)
    elif mode == "slow":
        slow(out, float(argv[2]) if len(argv) > 2 else 0.05)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
