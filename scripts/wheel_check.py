"""Check that a folder of wheels, installed with `pip --no-deps` on a given machine, leaves no requirement unmet.

    python scripts/wheel_check.py .whl                         # against this interpreter's installed packages
    python scripts/wheel_check.py .whl --assume-installed scripts/gpu_image_packages.txt   # a CPU dry run

`pip install --no-index --no-deps` (the only install possible on a machine that reaches no registry) checks
nothing, so a wheel whose needs are missing installs fine and fails at the first import. This reads each wheel's
METADATA and the project's own install_requires (setup.cfg), evaluates each `Requires-Dist` marker for the target
interpreter (`--python-version`, Linux x86-64), and looks for a provider: a wheel in the folder (its version must
satisfy the specifier), else a distribution installed in this interpreter (version checked too) -- or, with
`--assume-installed FILE` (a dry run for another machine), a name listed there instead (a machine's package list
without versions: reported as assumed).

Exit 0 when every requirement is met; 1, naming each unmet one and who needs it, otherwise. Two wheels of one
name are an error too (`pip` would stop the whole install). `--optional NAME` (repeatable): that wheel's unmet
needs are warnings (a dependency the GPU check does not import, e.g. `datasets`, only read for `hf:` inputs).
Only the standard library and `packaging` are used, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata as metadata
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8")
    return [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def project_requirements(setup_cfg: Path = ROOT / "setup.cfg") -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg, encoding="utf-8")
    lines = cfg.get("options", "install_requires", fallback="").splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def target_environment(python_version: str) -> dict:
    """Marker values of the target machine: Linux x86-64, CPython `python_version` (e.g. 3.12)."""
    env = default_environment()
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython", extra="")
    return env


def applies(req: Requirement, env: dict) -> bool:
    """False for a requirement of an extra or of another platform/Python."""
    return req.marker is None or req.marker.evaluate(env)


def read_wheels(folder: Path) -> tuple[dict[str, Version], dict[str, Path], list[str]]:
    """(name -> version, name -> file, problems) of the wheels in `folder`; a name twice is a problem."""
    versions, files, problems = {}, {}, []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, *_ = parse_wheel_filename(wheel.name)
        if name in versions:
            problems.append(f"two wheels of {name}: {files[name].name} and {wheel.name} (pip stops the whole "
                            f"install on this): keep one")
        versions[name], files[name] = version, wheel
    return versions, files, problems


def installed_version(name: str):
    try:
        return Version(metadata.version(name))
    except (metadata.PackageNotFoundError, ValueError):
        return None


def provider(req: Requirement, wheels: dict[str, Version], assumed: set[str] | None) -> tuple[bool, str]:
    """Whether `req` is met, and by what (or why not). With `assumed` (a dry run for another machine), this
    interpreter's own packages say nothing about the target and are not looked at."""
    name = canonicalize_name(req.name)
    if name in wheels:
        ok = req.specifier.contains(wheels[name], prereleases=True)
        return ok, f"wheel {name} {wheels[name]}" + ("" if ok else f" does not satisfy {req.specifier}")
    have = installed_version(name) if assumed is None else None
    if have is not None:
        ok = req.specifier.contains(have, prereleases=True)
        return ok, f"installed {name} {have}" + ("" if ok else f" does not satisfy {req.specifier}")
    if assumed is not None and name in assumed:
        return True, f"{name} assumed on the machine (its package list; version not known here)"
    return False, f"{name} is neither a wheel in the folder nor installed"


def check(folder: Path, python_version: str, assumed: set[str] | None, optional: set[str]) -> tuple[list, list, list]:
    """(errors, warnings, lines met) for the wheels in `folder` plus the project's own requirements."""
    wheels, files, errors = read_wheels(folder)
    env, warnings_, met = target_environment(python_version), [], []
    needers = [("cbs (setup.cfg)", project_requirements())]
    needers += [(f"{name} {wheels[name]}", wheel_requirements(path)) for name, path in files.items()]
    for who, reqs in needers:
        for req in reqs:
            if not applies(req, env):
                continue
            try:
                ok, how = provider(req, wheels, assumed)
            except InvalidRequirement as e:  # pragma: no cover - a wheel with a broken METADATA line
                ok, how = False, str(e)
            line = f"{who} needs {req}: {how}"
            if ok:
                met.append(line)
            elif canonicalize_name(who.split()[0]) in optional:
                warnings_.append(line)
            else:
                errors.append(line)
    return errors, warnings_, met


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="the folder of wheels (e.g. .whl)")
    ap.add_argument("--python-version", default="3.12", help="the target machine's Python (default 3.12)")
    ap.add_argument("--assume-installed", type=Path, default=None,
                    help="a file of package names (one a line, # comments) known to be on the target machine")
    ap.add_argument("--optional", action="append", default=[], help="a wheel whose unmet needs only warn")
    ap.add_argument("--verbose", action="store_true", help="also list each requirement met and by what")
    args = ap.parse_args(argv)
    if not args.folder.is_dir():
        print(f"wheel_check: {args.folder} is not a directory: run scripts/gpu_wheels.sh first", file=sys.stderr)
        return 2
    assumed = None
    if args.assume_installed:
        assumed = {canonicalize_name(line.split("#")[0].strip())
                   for line in args.assume_installed.read_text(encoding="utf-8").splitlines()
                   if line.split("#")[0].strip()}
    errors, warns, met = check(args.folder, args.python_version, assumed, {canonicalize_name(o) for o in args.optional})
    for line in met if args.verbose else []:
        print(f"  ok    {line}")
    for line in warns:
        print(f"  warn  {line} (optional: only needed by that package)")
    for line in errors:
        print(f"  MISSING {line}", file=sys.stderr)
    n = len(list(args.folder.glob("*.whl")))
    print(f"wheel_check: {n} wheels in {args.folder}, {len(met)} requirements met, {len(warns)} optional unmet, "
          f"{len(errors)} unmet")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
