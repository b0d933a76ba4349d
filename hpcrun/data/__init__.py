"""Lists kept as data (library names, paths) that admins extend from the config."""
