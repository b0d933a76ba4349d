"""hpcrun: run programs from single-file images as the same user, in place."""
VERSION = "0.1.0"
