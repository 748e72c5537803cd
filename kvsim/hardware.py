"""GPU specifications: memory, HBM bandwidth, peak FLOP/s and interconnect, from vendor datasheets.

Vendors quote HBM and GDDR capacities in binary units (a "80 GB" H100 has 80 GiB of HBM3 stacks), so
`memory_bytes` is the quoted figure in GiB. Bandwidths and FLOP/s are decimal (1 TB/s = 1e12 B/s), as
the datasheets give them. FLOP/s are dense tensor-core peaks, without structured sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsim.errors import UserError

GiB = 1024**3
GB = 1000**3
TB = 1000**4
TFLOPS = 1e12


@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """One accelerator's limits that decide step time and KV capacity."""

    name: str
    memory_bytes: int
    hbm_bandwidth_bytes_per_s: float
    fp16_flops_per_s: float
    """Dense FP16/BF16 tensor peak."""
    fp8_flops_per_s: float | None = None
    """Dense FP8 tensor peak; None where the GPU has no FP8 tensor cores."""
    interconnect_bandwidth_bytes_per_s: float = 0.0
    """GPU-to-GPU bandwidth (NVLink, Infinity Fabric) per GPU, all links, both directions summed as
    datasheets give it; 0 if none."""
    pcie_bandwidth_bytes_per_s: float = 64 * GB
    """Host link bandwidth per GPU, both directions summed as datasheets give it; one direction costs
    swapping KV to CPU memory."""
    source: str = ""

    def __post_init__(self) -> None:
        for field in ("memory_bytes", "hbm_bandwidth_bytes_per_s", "fp16_flops_per_s"):
            if getattr(self, field) <= 0:
                raise UserError(f"gpu {self.name!r}: {field} must be positive, got {getattr(self, field)}")

    def flops_per_s(self, weight_dtype: str) -> float:
        """Peak tensor FLOP/s for GEMMs with weights in `weight_dtype`.

        FP8 and INT8 weights run on the 8-bit tensor cores (FP16 where the GPU has none). INT4 weights
        are dequantised and multiplied in FP16 (W4A16 kernels), so they get the FP16 peak.
        """
        if weight_dtype in ("fp8", "int8") and self.fp8_flops_per_s:
            return self.fp8_flops_per_s
        return self.fp16_flops_per_s


_PRESETS = [
    GpuSpec(
        name="A100-40GB",
        memory_bytes=40 * GiB,
        hbm_bandwidth_bytes_per_s=1555 * GB,
        fp16_flops_per_s=312 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=600 * GB,
        pcie_bandwidth_bytes_per_s=64 * GB,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): 1,555 GB/s, 312 TFLOPS BF16, NVLink 600 GB/s",
    ),
    GpuSpec(
        name="A100-80GB",
        memory_bytes=80 * GiB,
        hbm_bandwidth_bytes_per_s=2039 * GB,
        fp16_flops_per_s=312 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=600 * GB,
        pcie_bandwidth_bytes_per_s=64 * GB,
        source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 2,039 GB/s, 312 TFLOPS BF16, NVLink 600 GB/s",
    ),
    GpuSpec(
        name="H100-SXM",
        memory_bytes=80 * GiB,
        hbm_bandwidth_bytes_per_s=3350 * GB,
        fp16_flops_per_s=989.4 * TFLOPS,
        fp8_flops_per_s=1978.9 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=900 * GB,
        pcie_bandwidth_bytes_per_s=128 * GB,
        source="NVIDIA H100 Tensor Core GPU datasheet (SXM): 3.35 TB/s, 989 TFLOPS BF16 and 1,979 FP8 dense, NVLink 900 GB/s, PCIe Gen5 128 GB/s",
    ),
    GpuSpec(
        name="H100-PCIe",
        memory_bytes=80 * GiB,
        hbm_bandwidth_bytes_per_s=2000 * GB,
        fp16_flops_per_s=756 * TFLOPS,
        fp8_flops_per_s=1513 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=600 * GB,
        pcie_bandwidth_bytes_per_s=128 * GB,
        source="NVIDIA H100 Tensor Core GPU datasheet (PCIe): 2 TB/s, 756 TFLOPS BF16 and 1,513 FP8 dense, NVLink bridge 600 GB/s",
    ),
    GpuSpec(
        name="H200",
        memory_bytes=141 * GiB,
        hbm_bandwidth_bytes_per_s=4800 * GB,
        fp16_flops_per_s=989.4 * TFLOPS,
        fp8_flops_per_s=1978.9 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=900 * GB,
        pcie_bandwidth_bytes_per_s=128 * GB,
        source="NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, 989 TFLOPS BF16 and 1,979 FP8 dense, NVLink 900 GB/s",
    ),
    GpuSpec(
        name="B200",
        memory_bytes=180 * GiB,
        hbm_bandwidth_bytes_per_s=7700 * GB,
        fp16_flops_per_s=2250 * TFLOPS,
        fp8_flops_per_s=4500 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=1800 * GB,
        pcie_bandwidth_bytes_per_s=128 * GB,
        source="NVIDIA HGX B200 datasheet, per GPU: 180 GB HBM3e, 7.7 TB/s, 2.25 PFLOPS BF16 and 4.5 PFLOPS FP8 dense, NVLink 1.8 TB/s",
    ),
    GpuSpec(
        name="L40S",
        memory_bytes=48 * GiB,
        hbm_bandwidth_bytes_per_s=864 * GB,
        fp16_flops_per_s=362.05 * TFLOPS,
        fp8_flops_per_s=733 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=0.0,
        pcie_bandwidth_bytes_per_s=64 * GB,
        source="NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, 362 TFLOPS BF16 and 733 FP8 dense, PCIe Gen4, no NVLink",
    ),
    GpuSpec(
        name="RTX-4090",
        memory_bytes=24 * GiB,
        hbm_bandwidth_bytes_per_s=1008 * GB,
        fp16_flops_per_s=165.2 * TFLOPS,
        fp8_flops_per_s=330.3 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=0.0,
        pcie_bandwidth_bytes_per_s=64 * GB,
        source="NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090): 24 GB GDDR6X, 1,008 GB/s, 165.2 TFLOPS FP16 and 330.3 FP8 dense with FP32 accumulate",
    ),
    GpuSpec(
        name="RTX-3090",
        memory_bytes=24 * GiB,
        hbm_bandwidth_bytes_per_s=936 * GB,
        fp16_flops_per_s=71 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=112.5 * GB,
        pcie_bandwidth_bytes_per_s=64 * GB,
        source="NVIDIA Ampere GA102 whitepaper (GeForce RTX 3090): 24 GB GDDR6X, 936 GB/s, 71 TFLOPS FP16 dense with FP32 accumulate, NVLink bridge 112.5 GB/s",
    ),
    GpuSpec(
        name="MI300X",
        memory_bytes=192 * GiB,
        hbm_bandwidth_bytes_per_s=5300 * GB,
        fp16_flops_per_s=1307.4 * TFLOPS,
        fp8_flops_per_s=2614.9 * TFLOPS,
        interconnect_bandwidth_bytes_per_s=896 * GB,
        pcie_bandwidth_bytes_per_s=128 * GB,
        source="AMD Instinct MI300X data sheet: 192 GB HBM3, 5.3 TB/s, 1,307.4 TFLOPS BF16 and 2,614.9 FP8 dense, Infinity Fabric 896 GB/s",
    ),
]

GPU_PRESETS: dict[str, GpuSpec] = {gpu.name: gpu for gpu in _PRESETS}


def load_gpu(name: str) -> GpuSpec:
    """Return the GPU preset `name` (case-insensitive), or raise UserError listing the presets."""
    lowered = {preset.lower(): gpu for preset, gpu in GPU_PRESETS.items()}
    gpu = lowered.get(name.lower())
    if gpu is None:
        raise UserError(f"unknown GPU preset {name!r}; choose one of: {', '.join(GPU_PRESETS)}")
    return gpu
