"""Load a tools/ script as a module: tools/ is not a package (and site-packages may hold an unrelated `tools`)."""

import importlib.util


def load_tool(repo_root, name):
    spec = importlib.util.spec_from_file_location(f"ws_d2_tool_{name}", repo_root / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
