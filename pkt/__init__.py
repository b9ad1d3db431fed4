"""pkt: parametric knowledge transfer between language models (LaTen, PostPKT, evaluation)."""
