"""hpcrun run-help IMAGE: the image's help text, as `apptainer run-help`.

A SIF's %help is read from its metadata objects, without mounting; other
images have none to show (their runscript is what `inspect` shows).
"""
import sys

from hpcrun import errors, image


def main(argv):
    if len(argv) != 1 or argv[0].startswith("-"):
        if argv[:1] in (["-h"], ["--help"]):
            print("usage: hpcrun run-help IMAGE   show the image's help (a SIF's %help section)")
            return 0
        raise errors.Error(errors.USAGE, "usage: hpcrun run-help IMAGE")
    img = image.open_image(argv[0])
    text = None
    if img.kind == "sif":
        from hpcrun import sif
        text = sif.metadata(img.path).get("helpfile")
    if not text:
        print("No help sections were defined for this image")
        return 0
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
