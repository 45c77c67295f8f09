"""HeadScope's command line: `python -m headscope {run,ls,export,probe,batch} ...`.

It sits above `capture` and `probes` (it runs both), which is why it is a room of its own and not
`capture/cli/` as DESIGN.md sketches: `capture` may not import `probes` (ARCHITECTURE.md).
"""
