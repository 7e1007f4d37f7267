"""Recording a pipeline's denoiser calls, storing them, and replaying them into another model.

A diffusers pipeline decides what its denoiser sees: its text encoder's states, its
scheduler's inputs and timesteps, image latents, rotary embeddings, ``added_time_ids``.
Teacher-forced fidelity feeds the quantized denoiser exactly what the full-precision one
was fed, so every call of the FP run is recorded — positional and keyword arguments, and
which expert ran it (``CallTracker``'s ``DenoiserCall``) — and replayed call by call into
the quantized model's expert of the same name.

Arguments are stored as tensors plus a JSON description of their structure (tensors,
tuples, lists, dicts, and plain scalars / None), so a recording goes into a safetensors
file with the rest of a generation. A tensor passed to several calls (the prompt states of
every step) is stored once.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qvd_bench.errors import UserError
from qvd_bench.models.sampling import CallTracker, DenoiserCall

CALL_PREFIX = "call."


@dataclass
class RecordedCall:
    """One denoiser call of a pipeline run.

    Attributes:
        expert: which denoiser ran it ("" for a single denoiser, else its pipeline
            attribute, ``LoadedModel.experts``).
        timestep: the call's timestep value (of its first sample).
        branches: the CFG branch of each equal chunk of the batch (("uncond", "cond") for a
            batched CFG call).
        args: the positional arguments, as passed.
        kwargs: the keyword arguments, as passed.
        output: the denoiser's prediction (its first output), (B, ...) on the CPU.
    """

    expert: str
    timestep: float
    branches: tuple[str, ...]
    args: tuple
    kwargs: dict[str, Any]
    output: Tensor | None = None

    def latents(self) -> Tensor:
        """The noisy latents the call denoised (its ``sample`` / ``hidden_states``)."""
        if self.args:
            return self.args[0]
        for name in ("sample", "hidden_states", "latents"):
            if name in self.kwargs:
                return self.kwargs[name]
        raise UserError(
            "a recorded denoiser call has no positional input and none of the keywords "
            "sample, hidden_states, latents: cannot tell which argument is the latent input"
        )


@dataclass
class CallRecorder:
    """Records every call of the tracked denoisers while it is active.

    Args:
        tracker: the attached CallTracker of the run (it keys each call).
        keep_inputs: record the arguments (the FP run: what a replay needs); otherwise
            only the expert, timestep, branches, latent input and output are kept.
    """

    tracker: CallTracker
    keep_inputs: bool = True
    calls: list[RecordedCall] = field(default_factory=list)
    _memo: dict[int, tuple[weakref.ref, Tensor]] = field(default_factory=dict)

    @contextlib.contextmanager
    def active(self) -> Iterator[CallRecorder]:
        handles = [
            module.register_forward_hook(self._hook(expert), with_kwargs=True)
            for expert, module in self.tracker.experts.items()
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._memo.clear()

    def _hook(self, expert: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            current: DenoiserCall | None = self.tracker.current
            if current is None:
                raise RuntimeError("a denoiser call ran without the call tracker")
            call = RecordedCall(expert, current.timestep, current.branches, (), {})
            if self.keep_inputs:
                call.args = tuple(self._copy(a) for a in args)
                call.kwargs = {k: self._copy(v) for k, v in kwargs.items()}
            else:
                probe = RecordedCall(expert, 0.0, (), args, kwargs)
                call.args = (probe.latents().detach().cpu().clone(),)
            call.output = prediction_of(output).detach().cpu().clone()
            self.calls.append(call)

        return hook

    def _copy(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            # A tensor passed to several calls is copied once (weakly remembered, so a
            # freed tensor's id reused by another is never mistaken for it).
            seen = self._memo.get(id(value))
            if seen is not None and seen[0]() is value:
                return seen[1]
            copied = value.detach().cpu().clone()
            self._memo[id(value)] = (weakref.ref(value), copied)
            return copied
        if isinstance(value, (tuple, list)):
            return type(value)(self._copy(v) for v in value)
        if isinstance(value, dict):
            return {k: self._copy(v) for k, v in value.items()}
        return value


def prediction_of(output: Any) -> Tensor:
    """The prediction tensor of a denoiser's output (a tuple with ``return_dict=False``,
    or an output object with ``sample``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    raise UserError(f"cannot find the prediction in a denoiser output of type {type(output)}")


# --------------------------------------------------------------------------- storing


def calls_to_tensors(calls: list[RecordedCall]) -> tuple[dict[str, Tensor], str]:
    """Flattens recorded calls into named tensors and a JSON description.

    Returns:
        (tensors named ``call.<n>``, the JSON string of each call's expert, timestep,
        branches, and the structure of its arguments and output).
    """
    tensors: dict[str, Tensor] = {}
    names: dict[int, str] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, Tensor):
            name = names.get(id(value))
            if name is None:
                name = f"{CALL_PREFIX}{len(tensors)}"
                names[id(value)] = name
                tensors[name] = value.contiguous()
            return {"tensor": name}
        if isinstance(value, tuple):
            return {"tuple": [encode(v) for v in value]}
        if isinstance(value, list):
            return {"list": [encode(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": {str(k): encode(v) for k, v in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        raise UserError(
            f"a denoiser argument of type {type(value).__name__} cannot be recorded "
            "(tensors, tuples, lists, dicts and plain scalars can)"
        )

    described = [
        {
            "expert": call.expert,
            "timestep": call.timestep,
            "branches": list(call.branches),
            "args": encode(call.args),
            "kwargs": encode(call.kwargs),
            "output": encode(call.output),
        }
        for call in calls
    ]
    return tensors, json.dumps(described)


def calls_from_tensors(tensors: Mapping[str, Tensor], description: str) -> list[RecordedCall]:
    """The inverse of ``calls_to_tensors``."""

    def decode(node: dict) -> Any:
        ((kind, value),) = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "tuple":
            return tuple(decode(v) for v in value)
        if kind == "list":
            return [decode(v) for v in value]
        if kind == "dict":
            return {k: decode(v) for k, v in value.items()}
        return value

    return [
        RecordedCall(
            expert=item["expert"],
            timestep=float(item["timestep"]),
            branches=tuple(item["branches"]),
            args=decode(item["args"]),
            kwargs=decode(item["kwargs"]),
            output=decode(item["output"]),
        )
        for item in json.loads(description)
    ]


# --------------------------------------------------------------------------- replaying


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def replay(
    experts: Mapping[str, nn.Module],
    calls: list[RecordedCall],
    tracker: CallTracker,
    sample_ids: tuple[int, ...],
) -> list[Tensor]:
    """Feeds each recorded call's arguments to the expert of the same name.

    Args:
        experts: expert name -> denoiser (``LoadedModel.experts``) of the model under test.
        calls: the FP run's recorded calls, with their arguments.
        tracker: the CallTracker on ``experts`` (per-timestep quantizers read it); the
            batch's sample ids and, for a single-branch call, its branch are announced.
        sample_ids: the samples of the recorded run.

    Returns:
        Each call's prediction, (B, ...) on the CPU, in call order.
    """
    outputs = []
    with contextlib.ExitStack() as stack:
        if tracker._handle is None:
            tracker.attach()
            stack.callback(tracker.detach)
        for call in calls:
            module = experts.get(call.expert)
            if module is None:
                raise UserError(
                    f"the recorded run called expert {call.expert or '(single denoiser)'!r}, "
                    f"which this model does not have (it has {', '.join(experts) or 'one'})"
                )
            device = next(module.parameters()).device
            branch = (
                tracker.branch(call.branches[0])
                if len(call.branches) == 1
                else contextlib.nullcontext()
            )
            with torch.no_grad(), tracker.batch(sample_ids), branch:
                output = module(*_to_device(call.args, device), **_to_device(call.kwargs, device))
            outputs.append(prediction_of(output).detach().cpu())
    return outputs
