"""The page cache a kernel had not yet written to disk: what ``sync`` would have written.

A dead kernel's dirty pages are the last writes its processes made. Those of the files
a recovered process holds open go with it (``process.FileState.dirty``); the rest of the
data volume's are found here, inode by inode of its file system, so that a service
started again from the volume, or a file written and closed just before the death,
loses no byte the kernel had accepted. A file on a tmpfs has no disk at all: its page
cache is the file (:class:`TmpfsFile`), which the new VM gets whole.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass

import drgn
from drgn.helpers.linux.fs import dentry_path, for_each_mount, inode_for_each_page
from drgn.helpers.linux.list import hlist_for_each_entry, list_for_each_entry
from drgn.helpers.linux.mm import PageDirty, PageUptodate, PageWriteback, page_to_phys
from drgn.helpers.linux.xarray import xa_for_each, xa_is_value

from transmigrate.errors import IntrospectionError
from transmigrate.introspect.kernel import Guest, drgn_errors
from transmigrate.introspect.pagetable import PAGE
from transmigrate.vm.volume import DATA_MOUNT

__all__ = ["TmpfsFile", "UnwrittenFile", "dirty_pages", "read_tmpfs_file", "shmem_pages",
           "unwritten_files"]


@dataclass(frozen=True)
class UnwrittenFile:
    """A file whose last writes the disk may not have: its size as the kernel knew it,
    and (page index, physical address) of each page the disk may lack."""

    path: str
    size: int
    dirty: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TmpfsFile:
    """A file, FIFO or directory on a tmpfs: its only copy was the dead kernel's memory
    and the new VM's tmpfs starts empty, so it is made there again, owned as it was, with
    its size and (index, physical address of) every page, before the restore opens it."""

    path: str
    mode: int
    uid: int
    gid: int
    size: int
    dirty: tuple[tuple[int, int], ...]
    """Named as :class:`UnwrittenFile`'s: tm-writeback writes both the same way."""


def read_tmpfs_file(guest: Guest, path: str, inode: drgn.Object) -> TmpfsFile:
    """The tmpfs file ``inode`` at ``path``; IntrospectionError if its pages cannot be
    trusted or some are in swap."""
    regular = stat.S_ISREG(int(inode.i_mode))  # a FIFO's bytes are the pipe's
    return TmpfsFile(path, int(inode.i_mode), int(inode.i_uid.val), int(inode.i_gid.val),
                     int(inode.i_size) if regular else 0,
                     shmem_pages(guest, inode) if regular else ())


def shmem_pages(guest: Guest, inode: drgn.Object) -> tuple[tuple[int, int], ...]:
    """(index, physical address) of each page of a shmem inode (a tmpfs file, shared
    anonymous memory): all of its contents, holes read as zeros."""
    pages: list[tuple[int, int]] = []
    limit = int(inode.i_size) // PAGE + 1
    for index, entry in xa_for_each(inode.i_mapping.i_pages.address_of_()):
        if xa_is_value(entry):
            raise IntrospectionError("has a page swapped out")
        if index > limit or len(pages) > limit:
            raise IntrospectionError("has a corrupt page cache")
        physical = int(page_to_phys(drgn.cast("struct page *", entry)))
        if not guest.ram.covers(physical, PAGE):
            raise IntrospectionError("has a page outside guest RAM")
        pages.append((index, physical))
    return tuple(pages)


def dirty_pages(guest: Guest, inode: drgn.Object) -> tuple[tuple[int, int], ...]:
    """Pages dirty or under writeback; and on ext4, when the disk may hold an older
    size than the kernel had, the cached pages it may lack. IntrospectionError for a
    page cache that cannot be trusted."""
    size = int(inode.i_size)
    limit = size // PAGE + 1
    on_disk = min(size, _size_on_disk(inode))
    dirty = []
    for count, (index, page) in enumerate(inode_for_each_page(inode)):
        if count > limit or index > limit:
            raise IntrospectionError("its page cache is corrupt")
        beyond = on_disk < size and (index + 1) * PAGE > on_disk and PageUptodate(page)
        if beyond or PageDirty(page) or PageWriteback(page):
            physical = int(page_to_phys(page))
            if not guest.ram.covers(physical, PAGE):
                raise IntrospectionError("a cached page is outside guest RAM")
            dirty.append((index, physical))
    return tuple(dirty)


def _size_on_disk(inode: drgn.Object) -> int:
    """How much of the file the disk is sure to hold after its journal is replayed. On
    ext4: the size its journal has (``i_disksize``) once the transaction that last
    changed the file's size or blocks (``i_datasync_tid``) has committed; until then
    none, as its written pages may lie past the committed size or in blocks whose
    mapping is not committed (an fsync caught waiting for its commit). Elsewhere, the
    whole file: only its dirty pages are missing."""
    superblock = inode.i_sb
    if superblock.s_type.name.string_() != b"ext4":
        return int(inode.i_size)
    ext4 = drgn.container_of(inode, "struct ext4_inode_info", "vfs_inode")
    journal = drgn.cast("struct ext4_sb_info *", superblock.s_fs_info).s_journal
    if journal:
        committed = int(journal.j_commit_sequence)
        if _tid_after(int(ext4.i_datasync_tid), committed):
            return 0
    return int(ext4.i_disksize)


def _tid_after(tid: int, other: int) -> bool:
    """jbd2's tid_gt: transaction ids wrap at 2**32."""
    difference = (tid - other) & 0xFFFF_FFFF
    return 0 < difference < 1 << 31


def unwritten_files(guest: Guest, mount_point: str = DATA_MOUNT) -> list[UnwrittenFile]:
    """Every regular file of the file system mounted at ``mount_point`` (in the initial
    mount namespace) with pages the disk may not have; none if nothing is mounted
    there. A file whose page cache cannot be trusted, or that has no name left (it was
    deleted), is passed over: it is no worse off than after a power cut."""
    with drgn_errors(f"cannot read the page cache of {mount_point}"):
        return list(_unwritten_files(guest, mount_point))


def _unwritten_files(guest: Guest, mount_point: str) -> Iterator[UnwrittenFile]:
    prog = guest.prog
    mounts = list(for_each_mount(prog, dst=mount_point))
    if not mounts:
        return
    superblock = mounts[-1].mnt.mnt_sb  # the last one mounted there is the one seen
    for inode in list_for_each_entry("struct inode", superblock.s_inodes.address_of_(),
                                     "i_sb_list"):
        if not stat.S_ISREG(int(inode.i_mode)) or not int(inode.i_nlink) \
                or not int(inode.i_mapping.nrpages):
            continue
        try:
            pages = dirty_pages(guest, inode)
        except IntrospectionError:
            continue
        if not pages:
            continue
        dentry = next(hlist_for_each_entry("struct dentry", inode.i_dentry.address_of_(),
                                           "d_u.d_alias"), None)
        if dentry is None:
            continue
        name = dentry_path(dentry).decode(errors="surrogateescape").lstrip("/")
        yield UnwrittenFile(f"{mount_point.rstrip('/')}/{name}", int(inode.i_size), pages)
