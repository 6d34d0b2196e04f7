"""`dynabatch generate`: stream one prompt's output to stdout."""
from __future__ import annotations

import os
import sys

from dynabatch.client import DynabatchClient, DynabatchError, tls_credentials


def generate(args) -> int:
    """Token: env DYNABATCH_AUTH_TOKEN (never a flag: command lines are visible to other users)."""
    creds = (tls_credentials(args.tls_ca, args.tls_client_cert, args.tls_client_key)
             if args.tls_ca or args.tls_client_cert else None)
    with DynabatchClient(args.target, timeout=args.timeout, credentials=creds,
                         token=os.environ.get("DYNABATCH_AUTH_TOKEN")) as client:
        try:
            final = None
            for msg in client.stream(args.prompt, max_tokens=args.max_tokens, model=args.model,
                                     temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, seed=args.seed):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                final = msg
        except DynabatchError as e:
            print(f"\ndynabatch generate: {e}", file=sys.stderr)
            return 1
    if final is not None:
        t = final.timings
        print(f"\n[{t.output_tokens} tokens, ttft {t.ttft_ms:.1f} ms, tpot {t.tpot_ms:.2f} ms]",
              file=sys.stderr)
    return 0
