"""Modal screens: confirmations, the re-protect plan, the restart report, help, the lease refusal."""
