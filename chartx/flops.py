"""The accelerators' peak FLOP/s, and model FLOPs utilization (a model family counts its
FLOPs: chartx.families.base.Family.flops_per_char)."""

from typing import Any


# Dense bf16 peak FLOP/s per JAX device, matched in order against device_kind (lower case).
# TPU v2 and v3 expose each of a chip's two TensorCores as a device: half the chip's peak.
# Sources (per chip): cloud.google.com/tpu/docs/v2 (45 TFLOP/s), /v3 (123), /v4 (275),
# /v5e (197), /v5p (459), /v6e (918). NVIDIA datasheets give BF16 Tensor Core figures "with
# sparsity", twice the dense peak: A100 312 dense (nvidia.com/en-us/data-center/a100),
# H100 SXM 1,979/2, H100 NVL 1,671/2, H100 PCIe 1,513/2 (nvidia.com/en-us/data-center/h100),
# H200 SXM 1,979/2, H200 NVL 1,671/2 (nvidia.com/en-us/data-center/h200).
_PEAK_FLOPS = (
    ("tpu v2", 45e12 / 2),
    ("tpu v3", 123e12 / 2),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p ("TPU v5" or "TPU v5p")
    ("tpu v6 lite", 918e12),  # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("a100", 312e12),
    ("h100 nvl", 1671e12 / 2),
    ("h100 pcie", 1513e12 / 2),
    ("h100", 1979e12 / 2),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200 nvl", 1671e12 / 2),
    ("h200", 1979e12 / 2),
)


def peak_flops(device: Any) -> float | None:
  """Dense bf16 peak FLOP/s of one JAX device, or None when unknown (CPUs, other accelerators).

  MFU = flops_per_char * chars_per_sec / (peak_flops(jax.devices()[0]) * jax.device_count()): mfu().
  """
  if getattr(device, "platform", "") == "cpu":
    return None
  kind = str(getattr(device, "device_kind", "")).lower()
  for name, peak in _PEAK_FLOPS:
    if name in kind:
      return peak
  return None


def mfu(flops_per_sec: float, devices: list[Any]) -> float | None:
  """Model FLOPs utilization of `flops_per_sec` achieved on `devices`; None without a known peak."""
  peak = peak_flops(devices[0])
  return flops_per_sec / (peak * len(devices)) if peak else None
