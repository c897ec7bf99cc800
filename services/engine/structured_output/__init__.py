"""Grammar-constrained decoding (xgrammar): what a request asks for (spec), compiling it once per
grammar (compiler), one matcher per request (matcher), and the token mask applied in the sampler.

Only `spec` is imported by the router; the rest imports xgrammar (and so torch) and lives in workers."""
