"""The data plane: one inference from a request's bytes to its answer's for every transport
(``inference``), the transport-neutral KServe V2 answers (``kserve``), repository control."""
