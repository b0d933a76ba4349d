"""`hpcrun build`: images from a specfile, with dependency solvers (docs/build.md).

    spec.py          the specfile grammar (docs/specfile.md)
    builder.py       staging, solvers, metadata, packing: one build
    tree.py          the staged root filesystem (symlink chains kept, writes confined)
    solve_elf.py     interpreter + DT_NEEDED, resolved as the host loader does
    solve_python.py  modules a script imports, found by its own interpreter
    solve_mpi.py     MPI programs and their MPI ABI (image metadata "mpi")
    base.py          `From:` bases: directory, image, docker save tarball, OCI layout
    pack.py          mksquashfs + imagefile.write_image (atomic)
"""
