# xen-ocaml-libs compiles its own tools/libxl for the OCaml bindings: the same
# patches as xen-libxl, so both trees agree. See meta-blktap3-xen-patches.inc.
require recipes-extended/xen/meta-blktap3-xen-patches.inc
