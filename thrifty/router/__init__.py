"""`thrifty router`: an OpenAI-compatible gateway in front of OpenAI-compatible backends.

It picks a replica per request (round robin, least loaded, prefix aware, or sticky by session),
keeps unhealthy replicas out of the pool, retries a request once on another replica when its
first replica fails before answering, and escalates requests to a tiered model name through
model tiers ordered by cost. It never imports torch, so it starts in a fraction of a second.
"""
