#!/usr/bin/env python3
"""Run a recipe's shell tasks outside bitbake: a small subset of bitbake's metadata parser.

  scripts/bb-tasks.py [--layer DIR] [--set VAR=VALUE]... RECIPE emit TASK...
      print a bash script that defines every shell function of RECIPE (and of the classes it
      inherits from the layer, the files it requires) with ${VAR} references expanded the way
      bitbake expands them when it writes a task's run file, and runs TASK... in order, each in
      its [dirs] the way bitbake does (do_install: ${D} cleaned, cwd ${B}).
  scripts/bb-tasks.py [--layer DIR] [--set VAR=VALUE]... RECIPE getvar VAR...
      print the expanded value of each VAR (its name is expanded too: FILES_${PN}).
  scripts/bb-tasks.py [--layer DIR] [--set VAR=VALUE]... RECIPE getflag VAR FLAG
      print the expanded value of VAR[FLAG] (SRC_URI[rustc.sha256sum]: getflag SRC_URI rustc.sha256sum).

--set gives the configuration (what bitbake.conf and local.conf would): it is applied before the
recipe is parsed, so the recipe's own assignments win, as in bitbake. Supported: VAR = / ?= / ??=
/ := / += / =+ / .= / =. , export, VAR_append / VAR_prepend / VAR_remove, line continuations,
inherit (classes found in the layer's classes/; others such as update-rc.d are skipped: they add
no build code), require / include, EXPORT_FUNCTIONS, shell functions and their _append /
_prepend. Python functions are skipped; flags are plain
assignments (VAR[flag] = "..."). Inline python (${@...}) is not evaluated: it is
an error in anything a task uses.
"""

import argparse
import os
import re
import sys

ASSIGN_RE = re.compile(
    r"^(?:export\s+)?(?P<var>[A-Za-z0-9_\-${}.+/~]+?)(?P<flag>\[[^\]]*\])?\s*"
    r"(?P<op>\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*(?P<q>[\"'])(?P<val>.*)(?P=q)\s*$",
    re.S,
)
SHFUNC_RE = re.compile(r"^(?:fakeroot\s+)?(?P<name>[A-Za-z0-9_\-${}.+]+)\s*\(\)\s*\{\s*$")
PYFUNC_RE = re.compile(r"^(?:fakeroot\s+)?python\s*(?:[A-Za-z0-9_\-${}.+]+)?\s*\(\)\s*\{\s*$")
DEF_RE = re.compile(r"^def\s+")
VARREF_RE = re.compile(r"\$\{([A-Za-z0-9_\-.+/]+)\}")
TASK_DIRS = {
    "do_configure": ("${B}", False),
    "do_compile": ("${B}", False),
    "do_install": ("${B}", True),
}


class BBError(Exception):
    pass


class Data:
    def __init__(self):
        self.vars = {}
        self.flags = {}
        self.weak = {}
        self.deferred = []  # (op, name, value) for _append/_prepend/_remove
        self.funcs = {}
        self.func_appends = []  # (name, op, body)
        self.inherited = set()

    def expand(self, s, seen=()):
        def repl(m):
            name = m.group(1)
            if name in seen:
                raise BBError(f"variable {name} references itself")
            val = self.get(name, seen + (name,))
            return m.group(0) if val is None else val

        prev = None
        while prev != s:
            prev = s
            s = VARREF_RE.sub(repl, s)
        return s

    def get(self, name, seen=()):
        raw = self.vars.get(name, self.weak.get(name))
        if raw is None:
            return None
        return self.expand(raw, seen or (name,))

    def set(self, name, op, val):
        if op == "=":
            self.vars[name] = val
        elif op == "?=":
            if name not in self.vars:
                self.vars[name] = val
        elif op == "??=":
            self.weak[name] = val
        elif op == ":=":
            self.vars[name] = self.expand(val)
        elif op in ("+=", "=+", ".=", "=."):
            cur = self.vars.get(name, self.weak.get(name, ""))
            sep = " " if op in ("+=", "=+") else ""
            if op in ("+=", ".="):
                self.vars[name] = cur + sep + val if cur else val
            else:
                self.vars[name] = val + sep + cur if cur else val
        else:
            raise BBError(f"unknown operator {op}")

    def finalize(self):
        for op, name, val in self.deferred:
            cur = self.vars.get(name, self.weak.get(name, ""))
            if op == "append":
                self.vars[name] = cur + val
            elif op == "prepend":
                self.vars[name] = val + cur
            else:
                drop = set(self.expand(val).split())
                self.vars[name] = " ".join(w for w in self.expand(cur).split() if w not in drop)
        # Names with references (FILES_${PN}) become their expanded names.
        for name in [n for n in self.vars if "${" in n]:
            self.vars[self.expand(name)] = self.vars.pop(name)
        for name, op, body in self.func_appends:
            name = self.expand(name)
            if name not in self.funcs:
                raise BBError(f"{name}_{op} for an undefined function")
            self.funcs[name] = body + self.funcs[name] if op == "prepend" else self.funcs[name] + body


def logical_lines(text):
    """Lines with backslash continuations joined, except inside functions (kept raw, as bitbake does)."""
    lines = text.split("\n")
    i = 0
    in_func = False
    while i < len(lines):
        line = lines[i]
        if in_func:
            if line.rstrip() == "}":
                in_func = False
            yield line
            i += 1
            continue
        if SHFUNC_RE.match(line) or PYFUNC_RE.match(line):
            in_func = True
            yield line
            i += 1
            continue
        if DEF_RE.match(line):
            yield line
            i += 1
            continue
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + lines[i]
        yield line
        i += 1


def parse_file(d, path, layer):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise BBError(f"{path}: {e}") from e
    classname = os.path.basename(path)[: -len(".bbclass")] if path.endswith(".bbclass") else None
    it = iter(logical_lines(text))
    for line in it:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = SHFUNC_RE.match(line)
        if m and not line.startswith("python"):
            body = []
            for fl in it:
                if fl.rstrip() == "}":
                    break
                body.append(fl)
            else:
                raise BBError(f"{path}: function {m.group('name')} is not closed")
            name = m.group("name")
            body_text = "\n".join(body) + "\n"
            mo = re.match(r"^(.*)_(append|prepend)$", name)
            if mo:
                d.func_appends.append((mo.group(1), mo.group(2), body_text))
            else:
                d.funcs[d.expand(name)] = body_text
            continue
        if PYFUNC_RE.match(line):
            for fl in it:
                if fl.rstrip() == "}":
                    break
            continue
        if DEF_RE.match(line):
            for fl in it:
                if fl and not fl[0].isspace():
                    raise BBError(f"{path}: cannot parse after a def: {fl}")
            continue
        words = stripped.split()
        if words[0] == "inherit":
            for cls in words[1:]:
                cls = d.expand(cls)
                cpath = os.path.join(layer, "classes", cls + ".bbclass")
                if cls in d.inherited or not os.path.exists(cpath):
                    continue
                d.inherited.add(cls)
                parse_file(d, cpath, layer)
            continue
        if words[0] in ("require", "include"):
            inc = d.expand(stripped.split(None, 1)[1])
            for base in (os.path.dirname(path), layer):
                cand = os.path.join(base, inc)
                if os.path.exists(cand):
                    parse_file(d, cand, layer)
                    break
            else:
                if words[0] == "require":
                    raise BBError(f"{path}: cannot find required file {inc}")
            continue
        if words[0] == "EXPORT_FUNCTIONS":
            if not classname:
                raise BBError(f"{path}: EXPORT_FUNCTIONS outside a class")
            for fn in words[1:]:
                d.funcs[fn] = f"    {classname}_{fn}\n"
            continue
        if words[0] in ("addtask", "deltask", "addhandler"):
            continue
        m = ASSIGN_RE.match(stripped)
        if not m:
            raise BBError(f"{path}: cannot parse: {stripped[:100]}")
        if m.group("flag"):
            d.flags[(d.expand(m.group("var")), m.group("flag")[1:-1])] = m.group("val")
            continue
        name, op, val = m.group("var"), m.group("op"), m.group("val")
        mo = re.match(r"^(.*)_(append|prepend|remove)$", name)
        if mo and op == "=":
            d.deferred.append((mo.group(2), mo.group(1), val))
        else:
            d.set(name, op, val)


def load(recipe, layer, sets):
    d = Data()
    base = os.path.basename(recipe)
    m = re.match(r"^([^_]+)(?:_([^_]+))?\.bb$", base)
    if not m:
        raise BBError(f"{recipe}: not a NAME_VERSION.bb recipe")
    d.vars["PN"] = m.group(1)
    d.vars["PV"] = m.group(2) or "1.0"
    d.vars["BP"] = "${PN}-${PV}"
    d.vars["S"] = "${WORKDIR}/${BP}"
    d.vars["B"] = "${S}"
    d.vars["SRCPV"] = "AUTOINC+0000000000"
    for s in sets:
        name, sep, val = s.partition("=")
        if not sep:
            raise BBError(f"--set {s}: expected VAR=VALUE")
        d.vars[name] = val
    parse_file(d, recipe, layer)
    d.finalize()
    return d


def emit(d, tasks):
    out = [
        "#!/usr/bin/env bash",
        "# Generated by scripts/bb-tasks.py: the recipe's shell functions as bitbake writes them.",
        "set -e",
        'bbnote() { echo "NOTE: $*"; }',
        'bbwarn() { echo "WARNING: $*" >&2; }',
        'bbdebug() { :; }',
        'bbfatal() { echo "ERROR: $*" >&2; exit 1; }',
        "",
    ]
    for name in sorted(d.funcs):
        body = d.expand(d.funcs[name])
        if "${@" in body:
            raise BBError(f"function {name} uses inline python, which this runner cannot evaluate")
        out += [f"{name}() {{", body.rstrip("\n"), "}", ""]
    for task in tasks:
        if task not in d.funcs:
            raise BBError(f"the recipe has no shell task {task}")
        dirs, clean_d = TASK_DIRS.get(task, ("${B}", False))
        cwd = d.expand(dirs)
        out.append(f"echo '=== {task}'")
        if clean_d:
            dest = d.get("D")
            if not dest or not dest.startswith("/"):
                raise BBError("D must be an absolute path")
            out.append(f"rm -rf '{dest}'")
            out.append(f"mkdir -p '{dest}'")
        out += [f"mkdir -p '{cwd}'", f"cd '{cwd}'", task]
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", help="the layer root (default: two directories above RECIPE's)")
    ap.add_argument("--set", action="append", default=[], metavar="VAR=VALUE")
    ap.add_argument("recipe")
    ap.add_argument("command", choices=["emit", "getvar", "getflag"])
    ap.add_argument("args", nargs="+")
    a = ap.parse_args()
    layer = a.layer or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(a.recipe))))
    try:
        d = load(a.recipe, layer, a.set)
        if a.command == "emit":
            sys.stdout.write(emit(d, a.args))
        elif a.command == "getflag":
            if len(a.args) != 2:
                raise BBError("getflag takes VAR FLAG")
            val = d.flags.get((d.expand(a.args[0]), a.args[1]))
            if val is None:
                raise BBError(f"{a.args[0]}[{a.args[1]}] is not set")
            print(d.expand(val))
        else:
            for name in a.args:
                val = d.get(d.expand(name))
                if val is None:
                    raise BBError(f"{name} is not set")
                print(val)
    except BBError as e:
        print(f"bb-tasks: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
