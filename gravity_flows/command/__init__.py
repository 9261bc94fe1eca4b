"""The command line shared by the scripts: options and their checks, the flow scripts' run, sweeps, the top level."""
