"""``adp serve``: OpenAI-compatible online serving over the persistent DP ranks
(docs/serving.md). ``server`` runs it, ``app`` is the HTTP API, ``state`` the requests in
flight, ``router`` picks a DP group, ``ranks`` starts and reaches the ranks, ``bench`` is
``adp bench-serve``."""
