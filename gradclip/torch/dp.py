"""DP-SGD for PyTorch: noise, normalisation, virtual steps, Poisson sampling, accounting.

``DPOptimizer(optimizer, per_sample, noise_multiplier=σ, expected_batch_size=B)`` turns the
clipped sum that :class:`~gradclip.torch.PerSample` writes into the DP-SGD update of Abadi et al.
2016 ("Deep learning with differential privacy"): ``(Σ_i c_i ∇_i + N(0, σ²C²)) / B`` with ``B``
the *expected* batch size of Poisson sampling (dividing by the drawn size would leak it).

    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ps,
                          noise_multiplier=1.1, expected_batch_size=256, sample_rate=256 / len(data))
    for x, y in gct.poisson_loader(data, sample_rate=256 / len(data)):
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
    opt.epsilon(delta=1e-5)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from gradclip._core.errors import InvalidArgumentError
from gradclip.clippers import QuantileNorm
from gradclip.torch.accounting import Accountant, check_noise
from gradclip.torch.optim import scaler_enabled, scaler_stage
from gradclip.torch.scaling import share_wrapper_stage
from gradclip.torch.per_sample import PerSample

__all__ = ["DPOptimizer", "PoissonBatchSampler", "poisson_loader"]


def _secure_generator(device: Any = "cpu") -> torch.Generator:
    # A seed from the OS CSPRNG: the noise and the sampling cannot be replayed from a seed an
    # observer could guess (a fixed seed makes DP-SGD's noise known, hence no privacy).
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


class DPOptimizer:
    """Noise, normalise and step: DP-SGD on top of :class:`~gradclip.torch.PerSample`.

    Args:
        optimizer: The wrapped optimizer (any ``torch.optim.Optimizer``).
        per_sample: The :class:`PerSample` that clips the model's per-example gradients.
        noise_multiplier: σ, ``>= 0``: the noise std is ``σ·C`` (``C`` the clipper's bound,
            the per-example sensitivity).
        expected_batch_size: The expected logical batch size ``B > 0`` (``q·N`` under Poisson
            sampling); the noised sum is divided by it (times the number of processes).
        sample_rate: q, to record each step in the accountant (None: no accounting).
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"`` (Opacus' accountants).
        generator: A ``torch.Generator`` for the noise (seed it for reproducible runs; not
            private: anyone with the seed knows the noise).
        secure_mode: Draw the generator's seed from ``os.urandom`` and sum four Gaussian draws
            per element (``N(0, σ²) = (Σ_{k≤4} N_k(0, σ²)) / 2``), the defence of Holohan &
            Braghin 2021 ("Secure random sampling in differential privacy") against the
            floating-point attacks of Mironov 2012, as Opacus' ``secure_mode``. Use it for
            real deployments; it excludes ``generator``.
        count_noise_multiplier: With ``QuantileNorm``: σ_b, the noise std of the unclipped
            count (Andrew et al. 2021; default ``max(B / 20, σ)``, the paper's ``B / 20`` when it
            is large enough). The gradient
            noise is then ``σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2)`` so that the pair costs exactly σ.
            The bound C moves once per logical step, in :meth:`step`: every physical batch
            (:meth:`virtual_step`) is clipped at the same C, the gradient noise is ``σ_Δ·C`` for
            that C, and C then moves from the count over all of the step's examples (over all
            processes of ``process_group``), noised once (on the group's first rank) and divided
            by the expected batch size (times the number of processes): the C of one process
            with the whole logical batch.
        scaler: A ``torch.amp.GradScaler`` (AMP): :meth:`backward` divides its scale out of the
            norms; :meth:`step` unscales once and steps through it, as ``ClippedOptimizer``.
            With :meth:`virtual_step`, every physical batch's sum is unscaled exactly once, also
            when ``scaler.unscale_(optimizer)`` ran before :meth:`step` (the sums kept from the
            earlier physical batches are then unscaled by the scale tensor, no host read), and
            an inf/NaN in any physical batch skips the step.
        process_group: With ``torch.distributed``: the clipped sums are summed over the group
            (per-example clipping stays local) and noise is added once, on the group's first
            rank; so is ``QuantileNorm``'s unclipped count, so every rank keeps the same C. Do
            not wrap the model in DDP (its all-reduce would average unclipped data).

    Raises:
        InvalidArgumentError: ``noise_multiplier < 0``, ``expected_batch_size <= 0``, a
            sample rate outside ``(0, 1]``, ``secure_mode`` with a ``generator``, an
            inconsistent ``count_noise_multiplier``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        per_sample: PerSample,
        noise_multiplier: float,
        expected_batch_size: int,
        *,
        sample_rate: float | None = None,
        accountant: str = "rdp",
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
        count_noise_multiplier: float | None = None,
        scaler: Any = None,
        process_group: Any = None,
    ):
        where = "DPOptimizer"
        if not isinstance(per_sample, PerSample):
            raise InvalidArgumentError(f"{where}: per_sample must be a gradclip.torch.PerSample, got {type(per_sample).__name__}")
        self.noise_multiplier = check_noise(where, noise_multiplier)
        if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size <= 0:
            raise InvalidArgumentError(f"{where}: expected_batch_size must be an int > 0, got {expected_batch_size!r}")
        if sample_rate is not None and not (0 < sample_rate <= 1):
            raise InvalidArgumentError(f"{where}: sample_rate must be in (0, 1] or None, got {sample_rate!r}")
        if secure_mode and generator is not None:
            raise InvalidArgumentError(f"{where}: secure_mode draws its own seed; do not pass a generator")
        bound = getattr(per_sample.clipper, "max_norm", None)
        if bound is not None and not isinstance(bound, (int, float)):
            # The noise is σ times the bound of the step; a schedule would need the step's
            # value at noise time, which PerSample does not expose.
            raise InvalidArgumentError(
                f"{where}: the clipper's max_norm is a schedule ({type(bound).__name__}); DP-SGD needs a fixed "
                "bound C (or QuantileNorm, whose bound DPOptimizer tracks)"
            )
        self.optimizer, self.per_sample = optimizer, per_sample
        self.expected_batch_size, self.sample_rate = expected_batch_size, sample_rate
        self.secure_mode, self.scaler, self.process_group = secure_mode, scaler, process_group
        self.accountant = Accountant(accountant) if sample_rate is not None else None
        self._generators: dict[Any, torch.Generator] = {}
        if generator is not None:
            self._generators[str(generator.device)] = generator
        self.grad_noise_multiplier = self.noise_multiplier
        self.count_noise_multiplier = None
        if isinstance(per_sample.clipper, QuantileNorm):
            # The paper's B/20, but never so small that the pair could not cost σ (2σ_b > σ).
            default = max(expected_batch_size / 20, self.noise_multiplier)
            sigma_b = default if count_noise_multiplier is None else count_noise_multiplier
            if self.noise_multiplier > 0:
                if not (sigma_b > 0 and 2 * sigma_b > self.noise_multiplier):
                    raise InvalidArgumentError(
                        f"{where}: count_noise_multiplier must exceed noise_multiplier / 2 = "
                        f"{self.noise_multiplier / 2:g} (Andrew et al. 2021, Theorem 1), got {sigma_b!r}"
                    )
                self.grad_noise_multiplier = (self.noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5
                self.count_noise_multiplier = sigma_b
        self._accumulated = False

    # -- the optimizer interface ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (always to None: :meth:`PerSample.backward` refuses stale ones)."""
        del set_to_none
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_example_losses: torch.Tensor) -> Any:
        """Clip each example's gradient and sum them into ``p.grad`` (through the scaler's
        scale with AMP). With QuantileNorm: at the current bound, counting the unclipped
        examples; :meth:`step` moves the bound once per logical step.

        Returns:
            The step's per-example :class:`~gradclip.ClipInfo`.
        """
        losses, scale = per_example_losses, None
        if scaler_enabled(self.scaler):
            scale = self.scaler.get_scale()
            losses = self.scaler.scale(per_example_losses)
        return self.per_sample.backward(losses, loss_scale=scale, move_bound=False)

    def virtual_step(self) -> None:
        """Keep this physical batch's clipped sum and clear ``p.grad`` for the next one: several
        physical batches make one logical step, with one extra copy of the parameters in memory."""
        for _, p in self.per_sample.parameters:
            if p.grad is None:
                continue
            kept = getattr(p, "_dp_summed", None)
            p._dp_summed = p.grad.detach().clone() if kept is None else kept.add_(p.grad)
            p.grad = None
        self._accumulated = True

    def step(self, closure: Any = None) -> Any:
        """Add the noise once, divide by the expected batch size, step; record the step in the
        accountant.

        Raises:
            InvalidArgumentError: A closure (DP-SGD's noise cannot be re-drawn per evaluation).
        """
        if closure is not None:
            raise InvalidArgumentError("DPOptimizer.step: closures are not supported (the noise is drawn once)")
        params = [p for _, p in self.per_sample.parameters]
        through_scaler = scaler_enabled(self.scaler)
        unscaled = False
        if through_scaler:
            share_wrapper_stage(self.scaler, self, self.optimizer)  # scaler.unscale_(this): once
            unscaled = scaler_stage(self.scaler, self.optimizer) == "unscaled"
            if unscaled:
                # The user unscaled p.grad (the last physical batch) before step(): the earlier
                # physical batches' sums, kept by virtual_step, still carry the scale.
                self._unscale_kept(params)
        for p in params:
            kept = getattr(p, "_dp_summed", None)
            if kept is not None:
                p.grad = kept if p.grad is None else kept.add_(p.grad)
                del p._dp_summed
            if p.grad is None:  # no example used it: its sum is zero, the noise is not
                p.grad = torch.zeros_like(p)
        self._accumulated = False
        if through_scaler and not unscaled:
            # Every physical batch's sum, still scaled, unscaled once with one inf check: an
            # overflow in any of them skips the step.
            self.scaler.unscale_(self.optimizer)
        world, noisy = 1, True
        if self.process_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(self.process_group)
            # Noise once for the whole group, on its first rank, before the sum: every rank
            # then holds the same noised total.
            noisy = dist.get_rank(self.process_group) == 0
        # The C every physical batch of this step was clipped at (QuantileNorm moves it below).
        std = self.grad_noise_multiplier * self.per_sample.sensitivity()
        for p in params:
            if noisy and self.noise_multiplier > 0:
                p.grad.add_(self._normal(p.shape, std, p.device).to(p.dtype))
        counts = None
        if isinstance(self.per_sample.clipper, QuantileNorm):
            # [unclipped, examples, non-finite] over the step's physical batches; the count
            # noised once for the group, as the gradients are.
            counts = self.per_sample.take_counts()
            if noisy and self.count_noise_multiplier is not None:
                counts[0] += self._normal((), self.count_noise_multiplier, counts.device)
        if self.process_group is not None:
            import torch.distributed as dist

            for p in params:
                dist.all_reduce(p.grad, group=self.process_group)
            if counts is not None:
                dist.all_reduce(counts, group=self.process_group)
        if counts is not None:
            noised = self.count_noise_multiplier is not None
            self.per_sample.move_bound(counts, self.expected_batch_size * world if noised else None)
        divisor = float(self.expected_batch_size * world)
        for p in params:
            p.grad.div_(divisor)
        result = self.scaler.step(self.optimizer) if through_scaler else self.optimizer.step()
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        return result

    def _unscale_kept(self, params: list[torch.Tensor]) -> None:
        """Unscale the sums virtual_step kept, as GradScaler.unscale_ unscales ``p.grad``: by the
        scale tensor (no host read), their inf/NaN recorded in the scaler's inf checks for this
        optimizer, so that ``scaler.step`` skips the step and ``update()`` backs off."""
        kept = [p._dp_summed for p in params if getattr(p, "_dp_summed", None) is not None]
        if not kept:
            return
        found = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
        groups: dict[Any, list[torch.Tensor]] = {}
        for tensor in kept:
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
        for (device, _), tensors in groups.items():
            scale = self.scaler.scale(torch.ones((), dtype=torch.float32, device=device))
            inv_scale = scale.double().reciprocal().float()  # in fp64, as GradScaler.unscale_
            if device not in found:
                found[device] = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, found[device], inv_scale)

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ (needs ``sample_rate``).

        Raises:
            InvalidArgumentError: No sample rate was given (nothing was accounted).
        """
        if self.accountant is None:
            raise InvalidArgumentError("DPOptimizer.epsilon: pass sample_rate= to account for privacy")
        return self.accountant.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state, the accountant's history and the clipper's state."""
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.accountant is not None:
            out["accountant"] = self.accountant.state_dict()
        clipper_state = self.per_sample.state
        if clipper_state is not None:
            # A NamedTuple of tensors (QuantileNorm's bound): plain dict for weights_only loads.
            out["clipper"] = {k: v.detach().clone() for k, v in clipper_state._asdict().items()}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (optimizer, accountant, clipper state)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.accountant is not None and "accountant" in state:
            self.accountant.load_state_dict(state["accountant"])
        if "clipper" in state:
            kind = self.per_sample.clipper.state_type
            self.per_sample._state = kind(**state["clipper"])
            self.per_sample._counts = None

    def _normal(self, shape: Any, std: Any, device: Any) -> torch.Tensor:
        key = str(torch.device(device))
        generator = self._generators.get(key)
        if generator is None:
            generator = _secure_generator(device) if self.secure_mode else torch.Generator(device=device)
            if not self.secure_mode:
                generator.manual_seed(int(torch.randint(2**62, (), device="cpu")))  # from torch's global seed
            self._generators[key] = generator
        std = torch.as_tensor(std, dtype=torch.float32, device=device)
        if not self.secure_mode:
            return torch.normal(0.0, 1.0, size=tuple(shape), generator=generator, device=device) * std
        total = torch.zeros(tuple(shape), device=device)
        for _ in range(4):
            total += torch.normal(0.0, 1.0, size=tuple(shape), generator=generator, device=device)
        return total / 2 * std


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson subsampling: each example joins each batch independently with probability q.

    The privacy amplification that DP-SGD's accounting assumes (Abadi et al. 2016; Mironov,
    Talwar & Zhang 2019) holds for this sampling, not for shuffled fixed-size batches. Batches
    vary in size and may be empty (:func:`poisson_loader` collates an empty batch).

    Args:
        num_samples: N, the dataset size (``>= 1``).
        sample_rate: q in ``(0, 1]``.
        steps: Batches per epoch (default ``round(1 / q)``: one pass in expectation).
        generator: A seeded ``torch.Generator`` (reproducible), or None.
        secure_mode: Seed from ``os.urandom`` (excludes ``generator``).

    Raises:
        InvalidArgumentError: An argument out of range.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        secure_mode: bool = False,
    ):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidArgumentError(f"PoissonBatchSampler: num_samples must be an int >= 1, got {num_samples!r}")
        if not (0 < sample_rate <= 1):
            raise InvalidArgumentError(f"PoissonBatchSampler: sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise InvalidArgumentError(f"PoissonBatchSampler: steps must be an int >= 1, got {steps!r}")
        if secure_mode and generator is not None:
            raise InvalidArgumentError("PoissonBatchSampler: secure_mode draws its own seed; do not pass a generator")
        self.num_samples, self.sample_rate = num_samples, float(sample_rate)
        self.steps = steps if steps is not None else max(1, round(1 / sample_rate))
        self.generator = _secure_generator() if secure_mode else generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()


def poisson_loader(dataset: Any, sample_rate: float, **kwargs: Any) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with :class:`PoissonBatchSampler` batches; an empty
    batch comes as tensors with a leading dimension of 0 (shaped like one example), so the
    training step runs and :class:`DPOptimizer` still adds noise.

    Args:
        dataset: A map-style dataset with ``len``.
        sample_rate: q.
        **kwargs: ``steps``, ``generator``, ``secure_mode`` for the sampler; the rest for the
            ``DataLoader`` (``num_workers``, ``collate_fn``...).
    """
    sampler_kw = {k: kwargs.pop(k) for k in ("steps", "generator", "secure_mode") if k in kwargs}
    collate = kwargs.pop("collate_fn", default_collate)
    sampler = PoissonBatchSampler(len(dataset), sample_rate, **sampler_kw)

    def collate_or_empty(batch: list) -> Any:
        if batch:
            return collate(batch)
        # Shaped like one example, cut to zero rows: the model's forward runs on an empty batch.
        return _empty_like(collate([dataset[0]]))

    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_or_empty, **kwargs)


def _empty_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(x) for x in batch)
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    return batch

