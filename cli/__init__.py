"""The front door: the `llmops` command (`cli.main`), the local stack it starts and stops (`cli.stack`) and the
scripted drift demo (`cli.drift_demo`). It sits above everything it starts: the flows, the server, the monitor.
"""
