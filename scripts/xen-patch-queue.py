#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Print the patch queue bitbake would apply to a Xen recipe, in order.

Usage: xen-patch-queue.py RECIPE.bb [BBAPPEND ...]

Reads the recipe, the files it requires/includes (found next to it, or under
the layer root for BBPATH-relative names) and the bbappends, the way bitbake
1.34 orders SRC_URI: plain assignments and += in parse order, then every
_append in parse order (recipe, its includes, then the bbappends). Python
expressions are limited to what xenclient-oe's Xen recipes use:
${@bb.utils.contains('DISTRO_FEATURES', X, A, B, d)}, evaluated with the
DISTRO_FEATURES given in $DISTRO_FEATURES (default: empty, i.e. blktap3 and
not blktap2). Anything else it cannot evaluate is an error, not a guess.

Prints one line per patch: PATH<TAB>STRIPLEVEL<TAB>FILE-THAT-ADDED-IT, and the
files it could not read (BBPATH names from other layers) on stderr as notes.
"""

import os
import re
import sys

FEATURES = set(os.environ.get("DISTRO_FEATURES", "").split())
ASSIGN = re.compile(
    r'^(?:export\s+)?([A-Za-z0-9_${}\-]+?)(_append|_prepend|_remove)?\s*'
    r'(\?\?=|\?=|:=|\+=|=\+|\.=|=\.|=)\s*"(.*)"\s*$', re.S)
FUNC_START = re.compile(r'^(?:python\s+)?[\w${}\-]*\s*\(\)\s*\{\s*$|^python\s*\(\)\s*\{\s*$')
CONTAINS = re.compile(
    r"""^bb\.utils\.contains\(\s*'DISTRO_FEATURES'\s*,\s*'([^']*)'\s*,"""
    r"""\s*'([^']*)'\s*,\s*'([^']*)'\s*,\s*d\s*\)$""")


class Queue:
    def __init__(self):
        self.vars = {}
        self.appends = []  # (value, file) in parse order
        self.sets = []     # SRC_URI value pieces from =/+= : (value, file)
        self.notes = []

    def eval_python(self, expr):
        m = CONTAINS.match(expr.strip())
        if not m:
            sys.exit("xen-patch-queue: cannot evaluate ${@%s}" % expr)
        wanted, yes, no = m.groups()
        return yes if set(wanted.split()) <= FEATURES else no

    def expand(self, s):
        for _ in range(20):
            n = re.sub(r'\$\{([A-Za-z0-9_\-]+)\}',
                       lambda m: self.vars.get(m.group(1), '\0%s\0' % m.group(1)), s)
            n = re.sub(r'\$\{@([^{}]*)\}', lambda m: self.eval_python(m.group(1)), n)
            if n == s:
                break
            s = n
        return s.replace('\0', '')

    def parse(self, path, layer_root):
        with open(path, encoding="utf-8") as f:
            raw = f.read().split('\n')
        lines, cur = [], ''
        for ln in raw:
            if ln.rstrip().endswith('\\'):
                cur += ln.rstrip()[:-1] + ' '
                continue
            lines.append(cur + ln)
            cur = ''
        in_func = False
        for ln in lines:
            s = ln.strip()
            if in_func:
                if ln.startswith('}'):
                    in_func = False
                continue
            if not s or s.startswith('#'):
                continue
            if FUNC_START.match(s):
                in_func = True
                continue
            m = re.match(r'^(require|include)\s+(.+)$', s)
            if m:
                name = self.expand(m.group(2).strip())
                cands = [os.path.join(os.path.dirname(path), name),
                         os.path.join(layer_root, name)]
                found = next((c for c in cands if os.path.isfile(c)), None)
                if found:
                    self.parse(found, layer_root)
                elif m.group(1) == 'require':
                    self.notes.append("%s: require %s: not in this layer, not read" %
                                      (os.path.basename(path), name))
                continue
            m = ASSIGN.match(s)
            if not m:
                continue
            var, op_suffix, op, val = m.groups()
            if var == 'SRC_URI':
                if op_suffix == '_append':
                    self.appends.append((val, path))
                elif op_suffix in ('_prepend', '_remove'):
                    sys.exit("xen-patch-queue: %s: SRC_URI%s is not handled" % (path, op_suffix))
                elif op in ('=', ':='):
                    self.sets = [(val, path)]
                elif op in ('+=', '.='):
                    self.sets.append((val, path))
                elif op in ('=+', '=.'):
                    self.sets.insert(0, (val, path))
                elif op in ('?=', '??=') and not self.sets:
                    self.sets = [(val, path)]
            elif op_suffix is None:
                if op in ('=', ':=') or (op in ('?=', '??=') and var not in self.vars):
                    self.vars[var] = val
                elif op in ('+=',):
                    self.vars[var] = self.vars.get(var, '') + ' ' + val
                elif op in ('.=',):
                    self.vars[var] = self.vars.get(var, '') + val

    def patches(self):
        out = []
        for val, path in self.sets + self.appends:
            for item in self.expand(val).split():
                if not item.startswith('file://'):
                    continue
                parts = item[len('file://'):].split(';')
                name, params = parts[0], dict(p.split('=', 1) for p in parts[1:] if '=' in p)
                is_patch = name.endswith(('.patch', '.diff')) or params.get('apply') == 'yes'
                if not is_patch or params.get('apply') == 'no':
                    continue
                if 'patchdir' in params:
                    sys.exit("xen-patch-queue: %s: patchdir= is not handled" % item)
                out.append((name, params.get('striplevel', '1'), path))
        return out


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    recipe = os.path.abspath(sys.argv[1])
    q = Queue()
    # layer root: the directory above recipes-*/
    root = recipe
    while os.path.basename(root) and not os.path.basename(root).startswith('recipes-'):
        root = os.path.dirname(root)
    q.parse(recipe, os.path.dirname(root))
    for app in sys.argv[2:]:
        app = os.path.abspath(app)
        aroot = app
        while os.path.basename(aroot) and not os.path.basename(aroot).startswith('recipes-'):
            aroot = os.path.dirname(aroot)
        q.parse(app, os.path.dirname(aroot))
    for note in q.notes:
        print("note: " + note, file=sys.stderr)
    for name, strip, src in q.patches():
        # FILESPATH: the bbappend's files/ (FILESEXTRAPATHS_prepend) first, then the recipe's
        dirs = [os.path.join(os.path.dirname(a), 'files') for a in map(os.path.abspath, sys.argv[2:])]
        dirs += [os.path.join(os.path.dirname(recipe), d) for d in ('files', '.')]
        found = next((os.path.join(d, name) for d in dirs if os.path.isfile(os.path.join(d, name))), None)
        if not found:
            sys.exit("xen-patch-queue: %s (from %s) not found in %s" % (name, src, ' '.join(dirs)))
        print("%s\t%s\t%s" % (found, strip, os.path.basename(src)))


if __name__ == '__main__':
    main()
