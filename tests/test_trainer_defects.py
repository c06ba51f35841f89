"""Trainer-integration defects a user found: loss-based skips under DDP, the transformers callback's
resume after attach(), its per-step queue, step numbering, and streak bookkeeping."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist
import torch.multiprocessing as mp

import gradclip
import gradclip.torch as gct
from gradclip.torch.trainer_signals import loss_across_ranks


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. loss-based skips under DDP: every rank judges the mean loss ------------------------------


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import torch.nn.functional as F

    result: dict = {}
    # ClippedOptimizer.step(loss=...) with a bad shard on rank 1 only.
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = gct.ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), gradclip.SkipOnSpike(signal="loss", min_history=4, window=16)
    )
    gen = torch.Generator().manual_seed(100 + rank)
    skips = []
    for s in range(8):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)
        if rank == 1 and s == 6:
            y = y * 100
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        skips.append(bool(opt.last_info.skip))
    result["skips"] = skips
    result["params"] = [p.detach().tolist() for p in model.module.parameters()]

    # The shared helper: the mean on every rank, the caller's tensor untouched; a number too.
    local = torch.tensor(float(rank + 1))
    spike = gradclip.SkipOnSpike(signal="both")
    result["mean"] = float(loss_across_ranks(local, spike))
    result["local_kept"] = float(local)
    result["number"] = float(loss_across_ranks(3.0 * (rank + 1), spike))
    # Not the clipper's process_group (where gradients are sharded, which can leave out
    # replicas): a one-process shard group still averages over every process.
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    spike.process_group = groups[rank]
    result["own_group"] = float(loss_across_ranks(local, spike))
    # A clipper that ignores the loss: the loss as given, no collective.
    plain = gradclip.GlobalNorm(1.0)
    result["plain_is_same"] = loss_across_ranks(local, plain) is local
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp_loss") / "rank")
    mp.spawn(_ddp_worker, args=(2, _port(), out), nprocs=2, join=True)
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


@pytest.mark.timeout(120)
def test_ddp_loss_skip_is_the_same_on_every_rank(ddp_results):
    a, b = ddp_results
    assert a["skips"] == b["skips"]
    assert a["skips"][6] is True and sum(a["skips"]) == 1  # the bad shard's step, on both ranks
    assert a["params"] == b["params"]


@pytest.mark.timeout(120)
def test_loss_across_ranks_averages_over_every_process(ddp_results):
    for rank, r in enumerate(ddp_results):
        assert r["mean"] == 1.5 and r["number"] == 4.5
        assert r["local_kept"] == rank + 1
        assert r["own_group"] == 1.5  # a one-process shard group does not narrow it
        assert r["plain_is_same"]


def test_loss_across_ranks_without_distributed_is_the_identity():
    loss = torch.tensor(2.0)
    assert loss_across_ranks(loss, gradclip.SkipOnSpike(signal="loss")) is loss
    assert loss_across_ranks(None, gradclip.SkipOnSpike(signal="loss")) is None


_PL_SCRIPT = r'''
import json, sys, torch, lightning as L, gradclip
from gradclip.lightning import GradClipCallback
out = sys.argv[1]
class R(L.LightningModule):
    def __init__(self):
        super().__init__(); torch.manual_seed(0); self.net = torch.nn.Linear(4, 1)
    def training_step(self, b, i):
        x, y = b
        if self.global_rank == 1 and i == 6: y = y * 100
        return torch.nn.functional.mse_loss(self.net(x), y)
    def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=0.01)
class Rec(L.Callback):
    s = ()
    def on_train_batch_end(self, t, pl, *a):
        c = [x for x in t.callbacks if isinstance(x, GradClipCallback)][0]; self.s = list(self.s) + [bool(c.last_info.skip)]
    def on_train_end(self, t, pl):
        json.dump({"skips": self.s, "w": [p.detach().tolist() for p in pl.parameters()]}, open(f"{out}.{t.global_rank}", "w"))
if __name__ == "__main__":
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    cb = GradClipCallback(gradclip.SkipOnSpike(signal="loss", min_history=4, window=16))
    t = L.Trainer(max_steps=8, accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=[cb, Rec()], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(R(), torch.utils.data.DataLoader(ds, batch_size=4))
'''


@pytest.mark.timeout(180)
def test_lightning_ddp_spawn_loss_skip_is_the_same_on_every_rank(tmp_path):
    pytest.importorskip("lightning")
    import subprocess

    script = tmp_path / "pl_ddp.py"
    script.write_text(_PL_SCRIPT)
    out = str(tmp_path / "rank")
    subprocess.run([sys.executable, str(script), out], check=True, timeout=170, capture_output=True)
    a, b = (json.load(open(f"{out}.{r}")) for r in range(2))
    assert a["skips"] == b["skips"] and a["skips"][6] is True
    assert a["w"] == b["w"]


# -- transformers: tiny models built from configs ------------------------------------------------


def _hf():
    return pytest.importorskip("transformers")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        self.x = torch.randint(0, 50, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _gpt2():
    transformers = _hf()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


def _args(out, **kw):
    transformers = _hf()
    base = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, report_to=[], max_grad_norm=0,
                logging_steps=1, save_strategy="no", learning_rate=1e-2, use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(out, callbacks=(), **kw):
    transformers = _hf()
    return transformers.Trainer(model=_gpt2(), args=_args(out, **kw), train_dataset=_Tokens(), callbacks=list(callbacks))


# -- 3. the per-step queue is bounded and starts empty with each train() -------------------------


def test_pending_values_stay_one_row_without_logging(tmp_path):
    from gradclip.transformers import GradClipCallback

    callback = GradClipCallback(gradclip.GlobalNorm(0.5))
    _trainer(tmp_path, [callback], logging_strategy="no", max_steps=12).train()
    assert len(callback._pending) == 1  # O(1), not one tensor per step
    assert callback._pending[0][-1].item() == 12  # the steps since the last log, counted on the device


def test_values_of_an_earlier_train_do_not_reach_the_next_logs(tmp_path):
    from gradclip.transformers import GradClipCallback

    callback = GradClipCallback(gradclip.GlobalNorm(1e-3))  # clips every step
    _trainer(tmp_path / "a", [callback], max_steps=6, logging_steps=4).train()  # steps 5-6 left unlogged
    callback.clipper = gradclip.GlobalNorm(1e9)  # clips nothing from now on
    trainer = _trainer(tmp_path / "b", [callback], max_steps=4, logging_steps=4)
    trainer.train()
    rates = [h["clip_rate"] for h in trainer.state.log_history if "loss" in h]
    assert rates == [0.0]


def test_clip_rate_is_the_share_of_clipped_steps_since_the_log(tmp_path):
    from gradclip.transformers import GradClipCallback

    callback = GradClipCallback(gradclip.GlobalNorm(1e-3))
    trainer = _trainer(tmp_path, [callback], max_steps=6, logging_steps=3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["clip_rate"] for h in logs] == [1.0, 1.0]
    assert callback._pending == []


# -- 2. restore_callback_states_from_checkpoint=True keeps an attached callback attached ---------


def test_restore_callback_states_keeps_the_attached_callback(tmp_path):
    from gradclip.transformers import GradClipCallback

    def clipper():
        return gradclip.SkipOnSpike(signal="loss", min_history=2)

    first = _trainer(tmp_path / "a", max_steps=4, save_strategy="steps", save_steps=2)
    GradClipCallback(clipper(), max_consecutive_skips=3).attach(first)
    first.train()
    seen = []

    class Seen:
        def observe(self, info, step=None):
            seen.append(step)

    trainer = _trainer(tmp_path / "b", max_steps=4, restore_callback_states_from_checkpoint=True)
    callback = GradClipCallback(clipper(), monitor=Seen(), max_consecutive_skips=3).attach(trainer)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    mine = [c for c in trainer.callback_handler.callbacks if isinstance(c, GradClipCallback)]
    assert mine == [callback] and trainer.callback_handler.callbacks[0] is callback
    assert int(callback.clipper.state_dict()["state"]["loss_count"]) == 4  # 2 restored + 2 resumed
    assert len(seen) == 2  # the attached callback's monitor, not a rebuilt one without it


def test_restore_callback_states_with_another_clipper_is_refused_by_name(tmp_path):
    from gradclip.transformers import GradClipCallback

    first = _trainer(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2)
    GradClipCallback(gradclip.SkipOnSpike(signal="loss", min_history=2)).attach(first)
    first.train()
    trainer = _trainer(tmp_path / "b", max_steps=4, restore_callback_states_from_checkpoint=True)
    GradClipCallback(gradclip.SkipOnSpike(signal="loss", min_history=3)).attach(trainer)
    with pytest.raises(gradclip.StateError, match="resume with the clipper the run was trained with"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


# -- 4. step numbers, last_info after a DivergenceError, resume without the callback's state -----


def test_transformers_monitor_steps_are_the_trainers(tmp_path):
    from gradclip.transformers import GradClipCallback

    seen = []

    class Seen:
        def observe(self, info, step=None):
            seen.append(step)

    trainer = _trainer(tmp_path, max_steps=4, logging_steps=1)
    GradClipCallback(gradclip.GlobalNorm(1.0), monitor=Seen()).attach(trainer)
    trainer.train()
    assert seen == [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4]


def test_transformers_last_info_counts_the_streak_after_divergence(tmp_path):
    from gradclip.transformers import GradClipCallback

    callback = GradClipCallback(gradclip.SkipAbove(max_norm=1e-6), max_consecutive_skips=2)
    trainer = _trainer(tmp_path, [callback], max_steps=6)
    with pytest.raises(gradclip.DivergenceError):
        trainer.train()
    assert int(callback.last_info.consecutive_skips) == 2


def _lightning():
    L = pytest.importorskip("lightning")

    class Reg(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, i):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def data(n=16):
        g = torch.Generator().manual_seed(1)
        ds = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
        return torch.utils.data.DataLoader(ds, batch_size=4)

    def trainer(root, **kw):
        base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root))
        base.update(kw)
        return L.Trainer(**base)

    return L, Reg, data, trainer


def test_lightning_last_info_counts_the_streak_after_divergence(tmp_path):
    _, Reg, data, trainer = _lightning()
    from gradclip.lightning import GradClipCallback

    callback = GradClipCallback(gradclip.SkipAbove(max_norm=1e-6), max_consecutive_skips=3)
    with pytest.raises(gradclip.DivergenceError):
        trainer(tmp_path, max_steps=10, callbacks=[callback]).fit(Reg(), data())
    assert int(callback.last_info.consecutive_skips) == 3
    assert int(callback.last_infos[0].consecutive_skips) == 3


def test_lightning_resume_without_the_callbacks_state_warns(tmp_path):
    L, Reg, data, trainer = _lightning()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from gradclip.lightning import GradClipCallback

    saved = tmp_path / "ck"
    trainer(tmp_path, max_steps=2, enable_checkpointing=True,
            callbacks=[ModelCheckpoint(dirpath=str(saved), every_n_train_steps=2)]).fit(Reg(), data())
    ckpt = str(next(saved.glob("*.ckpt")))
    callback = GradClipCallback(gradclip.ZClip())
    with pytest.warns(UserWarning, match="holds no GradClipCallback state.*ZClip starts fresh"):
        trainer(tmp_path, max_steps=4, callbacks=[callback]).fit(Reg(), data(), ckpt_path=ckpt)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # a stateless clipper loses nothing
        warnings.simplefilter("always")
        trainer(tmp_path, max_steps=4, callbacks=[GradClipCallback(gradclip.GlobalNorm(1.0))]).fit(Reg(), data(), ckpt_path=ckpt)
    assert not [w for w in caught if "GradClipCallback" in str(w.message)]
