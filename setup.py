"""Package list for setuptools, computed so it cannot drift from the source tree.

``llm2vec_fast/`` installs as itself; ``kernels/`` and ``export/`` live at the repository root but
install as ``llm2vec_fast.kernels`` and ``llm2vec_fast.export`` (nothing installs a top-level
``kernels`` or ``export``). Every sub-package found under those three folders ships. Everything
else (metadata, dependencies, entry points) is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

# source folder -> import name
PACKAGE_ROOTS = {"llm2vec_fast": "llm2vec_fast", "kernels": "llm2vec_fast.kernels", "export": "llm2vec_fast.export"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = [], {}
    for folder, name in PACKAGE_ROOTS.items():
        package_dir[name] = folder
        packages.append(name)
        for sub in find_packages(folder):
            packages.append(f"{name}.{sub}")
    # a sub-package of llm2vec_fast that is itself mapped elsewhere is listed once
    return sorted(set(packages)), package_dir


packages, package_dir = _packages()
package_data = {
    "llm2vec_fast": [
        "py.typed",  # PEP 561: covers the sub-packages
        # the default encoder's LoRA adapters (data folders, not packages)
        "default_adapters/*.json",
        "default_adapters/*/*.json",
        "default_adapters/*/*.safetensors",
    ]
}
setup(packages=packages, package_dir=package_dir, package_data=package_data)
