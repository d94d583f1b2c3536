# libxl (libxenlight, xl) for the Rust blktap3: the device path comes from
# libblktapctl (tap_ctl_create, tap_ctl_find_device), read-only disks are opened
# read-only, no tapdev major or host include path. See meta-blktap3-xen-patches.inc.
require recipes-extended/xen/meta-blktap3-xen-patches.inc
