#!/usr/bin/env python3
"""Parse the meta-blktap3 layer with a real bitbake (pyro's 1.34) and compare its task code with
scripts/bb-tasks.py's.

  scripts/bb134-check.py BITBAKE_LIB [LAYER]

BITBAKE_LIB is the lib/ directory of a bitbake 1.34 checkout (not part of this repository; for
example `git archive 1.34 lib` of openembedded/bitbake). The check
  - parses conf/layer.conf with bitbake's conf parser;
  - parses every recipe of the layer with bitbake's recipe parser (classes the layer does not have,
    such as base, native and update-rc.d, are empty stand-ins: oe-core is not needed) and every
    .bbappend as an include, so any syntax pyro rejects (':append', ':${PN}', ...) fails here;
  - writes do_configure/do_compile/do_install with bitbake's emit_func (which also runs its shell
    parser over them and the functions they call) and checks that scripts/bb-tasks.py, which
    test-layer.sh uses to run the tasks outside bitbake, yields the same function bodies.
Exit status 0 when all of that holds. Python 3.10+ lacks a few aliases bitbake 1.34 imports; they
are restored before the import.
"""

import collections
import collections.abc
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile

CONF = {
    "WORKDIR": "/W", "D": "${WORKDIR}/image", "STAGING_BINDIR_NATIVE": "/N", "prefix": "/usr",
    "exec_prefix": "/usr", "bindir": "/usr/bin", "sbindir": "/usr/sbin", "libdir": "/usr/lib",
    "libexecdir": "/usr/libexec", "includedir": "/usr/include", "sysconfdir": "/etc",
    "datadir": "/usr/share", "mandir": "/usr/share/man", "TARGET_ARCH": "i686",
    "TARGET_SYS": "i686-oe-linux", "CC": "i686-oe-linux-gcc -m32 -march=core2", "LDFLAGS": "-Wl,-O1",
    "BUILD_CC": "gcc", "BUILD_LDFLAGS": "-L/N/lib", "PARALLEL_MAKE": "-j 4", "SRCPV": "AUTOINC+0000000000",
}
TASKS = ("do_configure", "do_compile", "do_install")


def load_bitbake(lib):
    for name in ("MutableMapping", "KeysView", "ValuesView", "ItemsView", "Mapping", "MutableSet",
                 "Callable", "Iterable", "Sequence"):
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))
    sys.path.insert(0, lib)
    import warnings
    warnings.simplefilter("ignore", SyntaxWarning)
    import bb  # noqa: F401
    import bb.data
    import bb.parse
    import bb.parse.parse_py.BBHandler  # noqa: F401
    import bb.parse.parse_py.ConfHandler  # noqa: F401
    import bb.siggen
    return bb


def load_bbtasks(root):
    spec = importlib.util.spec_from_file_location("bbtasks", os.path.join(root, "scripts", "bb-tasks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def split_funcs(script):
    """{name: body} of the shell functions in an emitted script (bodies stripped of blank lines)."""
    funcs, name, body = {}, None, []
    for line in script.split("\n"):
        m = re.match(r"^([A-Za-z0-9_.+-]+)\(\) \{$", line)
        if name is None and m:
            name, body = m.group(1), []
        elif name is not None and line == "}":
            funcs[name] = "\n".join(x.rstrip() for x in body if x.strip())
            name = None
        elif name is not None:
            body.append(line)
    return funcs


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = os.path.abspath(sys.argv[1])
    layer = os.path.abspath(sys.argv[2] if len(sys.argv) > 2 else os.path.join(root, "meta-blktap3"))
    bb = load_bitbake(lib)
    bbtasks = load_bbtasks(root)
    problems = []
    stubs = tempfile.mkdtemp(prefix="bb134-")
    try:
        os.makedirs(os.path.join(stubs, "classes"))
        inherits = set()
        files = []
        for dirpath, _, names in os.walk(layer):
            for n in names:
                f = os.path.join(dirpath, n)
                if n.endswith((".bb", ".bbappend", ".bbclass", ".inc")):
                    files.append(f)
                    with open(f, encoding="utf-8") as fh:
                        for line in fh:
                            if line.startswith("inherit "):
                                inherits.update(line.split()[1:])
        for cls in inherits | {"base"}:
            if not os.path.exists(os.path.join(layer, "classes", cls + ".bbclass")):
                with open(os.path.join(stubs, "classes", cls + ".bbclass"), "w") as fh:
                    fh.write("# empty stand-in for the parse check\n")

        d = bb.data.init()
        d.setVar("BBPATH", stubs + ":" + layer)
        d.setVar("TOPDIR", stubs)
        d.setVar("LAYERDIR", layer)
        bb.parse.handle(os.path.join(layer, "conf", "layer.conf"), d, include=True)
        print("layer.conf: collection %s, priority %s, LAYERDEPENDS %s, BBMASK %s" % (
            d.getVar("BBFILE_COLLECTIONS").strip(), d.getVar("BBFILE_PRIORITY_meta-blktap3"),
            d.getVar("LAYERDEPENDS_meta-blktap3"), (d.getVar("BBMASK") or "").strip()))
        d.delVar("LAYERDIR")
        d.setVar("PN", "${@bb.parse.BBHandler.vars_from_file(d.getVar('FILE', False),d)[0] or 'defaultpkgname'}")
        d.setVar("PV", "${@bb.parse.BBHandler.vars_from_file(d.getVar('FILE', False),d)[1] or '1.0'}")
        for k, v in CONF.items():
            d.setVar(k, v)
        bb.parse.siggen = bb.siggen.init(d)

        for f in sorted(files):
            rel = os.path.relpath(f, layer)
            try:
                if f.endswith(".bbappend"):
                    inc = os.path.join(stubs, os.path.basename(f) + ".inc")
                    shutil.copy(f, inc)
                    bb.parse.handle(inc, bb.data.createCopy(d), include=True)
                    print(f"{rel}: parsed (as an include)")
                    continue
                if not f.endswith(".bb"):
                    continue
                rd = bb.parse.handle(f, bb.data.createCopy(d))[""]
            except Exception as e:  # bitbake raises many kinds; all are a failed parse here
                problems.append(f"{rel}: bitbake 1.34 cannot parse it: {e}")
                continue
            n_src = len((rd.getVar("SRC_URI") or "").split())
            print(f"{rel}: parsed: PN {rd.getVar('PN')}, PV {rd.getVar('PV')}, {n_src} SRC_URI entries")
            sets = [f"{k}={v}" for k, v in CONF.items()]
            ours = bbtasks.load(f, layer, sets)
            for task in TASKS:
                if rd.getVar(task) is None or rd.getVarFlag(task, "noexec"):
                    continue
                out = io.StringIO()
                try:
                    bb.data.emit_func(task, out, rd)
                except Exception as e:
                    problems.append(f"{rel}: bitbake cannot emit {task}: {e}")
                    continue
                theirs = split_funcs(out.getvalue())
                mine = split_funcs(bbtasks.emit(ours, []))
                for name, body in theirs.items():
                    if mine.get(name) != body:
                        problems.append(f"{rel}: {name} differs between bitbake 1.34 and bb-tasks.py")
                print(f"  {task}: bitbake emits {', '.join(sorted(theirs))}; bb-tasks.py agrees" if not any(
                    mine.get(n) != b for n, b in theirs.items()) else f"  {task}: MISMATCH")
    finally:
        shutil.rmtree(stubs, ignore_errors=True)
    for p in problems:
        print("bb134-check:", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
