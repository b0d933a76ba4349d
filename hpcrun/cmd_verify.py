"""hpcrun verify IMAGE [--allowed-signers FILE] [--keyring FILE]: check an image's signatures.

hpcrun images: reads the whole payload (its sha256 must match the header),
then checks each signature with ssh-keygen against the allowed_signers file
(the option, else the site's allowed_signers).  SIF files: checks
Apptainer's PGP signatures with gpgv against the keyring (the option, else
the site's sif_keyring) and recomputes the digests they sign (sifsign.py).
Exit 0: at least one good signature from an allowed, valid key (for a SIF:
one that covers the primary partition); 77: unsigned, or no signer allowed;
65: corrupt or changed after signing (docs/sign.md).
"""
import argparse
import json
import sys

from hpcrun import config, errors, image, signature


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise errors.Error(errors.USAGE, message, self.prog)


def main(argv):
    p = Parser(prog="hpcrun verify", description="Verify an hpcrun image's OpenSSH signatures (docs/sign.md).")
    p.add_argument("--allowed-signers", metavar="FILE",
                   help="ssh-keygen allowed_signers file (default: allowed_signers in hpcrun.conf)")
    p.add_argument("--keyring", metavar="FILE",
                   help="OpenPGP public keys (binary or armored), for Apptainer's PGP-signed SIF files "
                        "(default: sif_keyring in hpcrun.conf)")
    p.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    p.add_argument("image", metavar="IMAGE")
    args = p.parse_args(argv)
    img = image.open_image(args.image)
    if img.kind == "sif":
        return _verify_sif(img, args)
    allowed = args.allowed_signers or config.load().get("allowed_signers")
    if not allowed:
        raise errors.Error(errors.USAGE, "no allowed_signers file: give --allowed-signers FILE "
                           "(or the site sets allowed_signers in hpcrun.conf)")
    signature.check_allowed_signers(allowed, site=False)
    if img.kind != "hpcrun":
        raise errors.Error(errors.NOPERM, "not signed: a %s image carries no hpcrun signature" % img.kind, img.path)
    h, results = signature.verify_image(img.path, allowed)
    good = [r for r in results if r.principal]
    if args.json:
        json.dump({"path": img.path, "sha256_verified": h.sha256, "verified": bool(good),
                   "signatures": [r.describe() for r in results]}, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        out = ["%s: payload sha256 %s matches its header" % (img.path, h.sha256)]
        for r in results:
            who = "%s %s (%s)" % (r.sig.key_type, r.sig.fingerprint, r.sig.claimed or "no name given")
            out.append("  good signature by %s, key %s" % (r.principal, who) if r.principal
                       else "  not accepted: %s: %s" % (who, r.reason))
        print("\n".join(out))
        sys.stdout.flush()
    if good:
        return 0
    if not results:
        raise errors.Error(errors.NOPERM, "not signed", img.path)
    if not any(r.matches for r in results):
        raise errors.Error(errors.DATA, results[0].reason, img.path)
    raise errors.Error(errors.NOPERM, "no signature from an allowed, valid key", img.path)


def _verify_sif(img, args):
    from hpcrun import sifsign
    keyring = args.keyring or config.load().get("sif_keyring")
    if not keyring:
        raise errors.Error(errors.USAGE, "no keyring for a SIF's PGP signatures: give --keyring FILE "
                           "(or the site sets sif_keyring in hpcrun.conf)")
    results, primary = sifsign.verify(img.path, keyring)
    try:
        good = sifsign.accepted(img.path, results, primary)
        failure = None
    except errors.Error as e:
        good, failure = [], e
    if args.json:
        json.dump({"path": img.path, "format": "sif", "primary_object": primary, "verified": bool(good),
                   "signatures": [r.describe() for r in results]}, sys.stdout, indent=1, sort_keys=True)
        sys.stdout.write("\n")
    else:
        out = ["%s: SIF, primary partition is object %s" % (img.path, primary)]
        for r in results:
            if r.signer:
                out.append("  good %s signature by %s, covers objects %s%s" % (
                    r.kind.upper(), r.principal, ", ".join(map(str, r.covers)),
                    "" if primary in r.covers else " (not the primary partition)"))
            else:
                out.append("  not accepted: %s %s (signs %s): %s" % (
                    r.kind.upper(), ", ".join(r.claimed) or "(no key named)", r.signs, r.reason))
        print("\n".join(out))
        sys.stdout.flush()
    if failure is not None:
        raise failure
    return 0
