"""The ``adp`` commands, one module each: ``add_parser(sub, common, fmt)`` declares its flags,
``run(args, stage)`` checks them and does the work (torch is imported only after the checks).
``flags`` holds what several commands share. adp_pass/cli.py assembles them.
"""
