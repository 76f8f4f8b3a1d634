"""lapa_dist: Latent Action Pretraining (LAPA) from actionless video, at cluster scale, in PyTorch."""

from setuptools import find_packages, setup

# torch is installed first, pinned (the Makefile does it): a bare `torch` requirement would pull a
# multi-GB CUDA build on CPU machines, so the range below admits the installed wheel.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "numpy>=1.26",
    "pydantic>=2.6",
    "webdataset>=1.0",
    "av>=14",
    "pyarrow>=15",
    "google-crc32c>=1.5",
    "pillow>=10",
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    # Upper bounds at the next major (minor for peft) above the versions tested (transformers 5.25, accelerate
    # 1.16, peft 0.21): lapa_dist/models/lora.py works around bugs inside peft's megatron-core LoRA layers.
    "transformers>=4.45,<6",
    "accelerate>=1.0,<2",
    "safetensors>=0.4",
    "peft>=0.17,<0.22",
    "triton>=3.0",
    "wandb>=0.18",
    "tqdm>=4.66",
    "rich>=13",
    "matplotlib>=3.8",
    "fastapi>=0.110",
    "uvicorn>=0.29",
    "packaging",
]

EXTRAS = {
    # Tests; DALI's CUDA wheel also runs CPU pipelines (VP9), which the tests exercise.
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "nvidia-dali-cuda130>=2.4", "ruff>=0.6"],
    # Meta-World scripted demos and closed-loop evaluation (needs EGL: libegl1 libegl-mesa0 libgl1-mesa-dri).
    "sim": ["metaworld==3.1.1", "mujoco==3.3.0", "gymnasium>=1.0", "packaging"],
    # GPU machines: fused attention and DALI's GPU (mixed) H.264 decoder.
    "gpu": ["flash-attn>=2.6", "nvidia-dali-cuda130>=2.4"],
}

setup(
    name="lapa_dist",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["lapa_dist", "lapa_dist.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
