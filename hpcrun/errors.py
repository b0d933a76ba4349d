"""The one error type users see, and the exit codes it maps to.

Every user-facing failure is raised as Error(code, what, subject) and printed
by cli.main() as one line: ``hpcrun: error: <what> (<subject>)``.  The codes
follow sysexits(3) so that scripts can tell a bad image from a bad command
line; 126/127 follow the shell for the command itself.  docs/exit-codes.md
is the table users read; keep the two in step.
"""

USAGE = 64        # bad command line, malformed bind/env spec
DATA = 65         # not an image, corrupt, truncated, unsupported version
NOINPUT = 66      # image, bind source or file missing or unreadable
MPI_ABI = 68      # host libraries and the image cannot work together: MPI ABI/launcher, or
                  # host MPI/GPU driver libraries needing a newer glibc than the image has
UNAVAILABLE = 69  # host lacks a feature (user namespaces, FUSE, squashfuse)
SOFTWARE = 70     # internal error: a bug in hpcrun
OSERR = 71        # a mount or namespace operation failed
CANTCREATE = 73   # output file cannot be created (build)
NOPERM = 77       # refused by policy: forbidden bind, escape from the root
CONFIG = 78       # bad system configuration file
NOTEXEC = 126     # command found in the image but not executable
NOTFOUND = 127    # command not found in the image


class Error(Exception):
    def __init__(self, code, what, subject=None):
        super().__init__(what)
        self.code = code
        self.what = what
        self.subject = subject

    def line(self):
        if self.subject is None or self.subject == "":
            return "hpcrun: error: %s" % self.what
        return "hpcrun: error: %s (%s)" % (self.what, self.subject)
