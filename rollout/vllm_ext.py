"""Loading an adapter into vLLM's worker from memory instead of from a file.

vLLM loads a LoRA from a folder. The sampler already holds the validated payload in memory,
so writing it to /dev/shm only for vLLM to parse it back with safetensors costs two copies
and ~20 ms per version. `InMemoryAdapters` is mixed into vLLM's worker (vLLM's
`worker_extension_cls`); the sampler hands it the payload with `collective_rpc`, and vLLM's
own path runs unchanged (adapter_config.json checks, name mapping, LRU cache, activation)
except that the weights come from memory, not from a file: the folder holds only
adapter_config.json, and the worker keeps each resident version's tensors until it is removed.

This module runs inside vLLM's engine process; it relies on one vLLM internal,
`WorkerLoRAManager._lora_model_cls`, checked at first use. vLLM imports it before the worker
builds its model, which is when vLLM-CPU is given rollout/cpu_lora.py's LoRA ops.
"""

from __future__ import annotations

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.request import LoRARequest

from rollout import cpu_lora

cpu_lora.install()

TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Adapter folder -> (payload, layout), for as long as the adapter is resident: vLLM may load
# an adapter again from its folder (after evicting it from its cache, or reloading weights).
_resident: dict[str, tuple[bytes, list[dict]]] = {}


class _LoRAFromMemory(LoRAModel):
    @classmethod
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *, moe_ep_spec=None, **kwargs):
        if lora_dir not in _resident:
            return super().from_local_checkpoint(lora_dir, expected_lora_modules, peft_helper,
                                                 moe_ep_spec=moe_ep_spec, **kwargs)
        payload, layout = _resident[lora_dir]
        # A fresh copy per load: vLLM scales lora_B in place when it activates an adapter.
        tensors = tensors_from_payload(torch.frombuffer(bytearray(payload), dtype=torch.uint8), layout)
        return cls.from_lora_tensors(tensors=tensors, peft_helper=peft_helper, **kwargs)


def tensors_from_payload(payload: torch.Tensor, layout: list[dict]) -> dict[str, torch.Tensor]:
    """Views into a uint8 payload, per the channel's layout [{name, dtype, shape, offset, nbytes}]."""
    return {t["name"]: payload[t["offset"]:t["offset"] + t["nbytes"]].view(TORCH_DTYPES[t["dtype"]]).view(t["shape"])
            for t in layout}


class InMemoryAdapters:
    """Methods added to vLLM's worker class, called through `LLM.collective_rpc`."""

    def add_adapter_from_memory(self, name: str, lora_id: int, folder: str, layout: list[dict],
                                payload: bytes) -> bool:
        manager = self.model_runner.lora_manager
        if manager._lora_model_cls not in (LoRAModel, _LoRAFromMemory):
            raise RuntimeError(f"unexpected vLLM LoRA model class {manager._lora_model_cls}")
        manager._lora_model_cls = _LoRAFromMemory
        _resident[folder] = (bytes(payload), layout)  # owned (a no-op if IPC already gave bytes)
        try:
            return self.add_lora(LoRARequest(name, lora_id, folder))
        except BaseException:
            del _resident[folder]
            raise

    def remove_adapter_from_memory(self, lora_id: int, folder: str) -> bool:
        _resident.pop(folder, None)
        return self.remove_lora(lora_id)
