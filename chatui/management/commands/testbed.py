"""`manage.py testbed up|status|down`: real Letta servers on 127.0.0.1 for conformance tests.

`up` installs what is missing under DATA_DIR/testbed (first time: several minutes),
starts the scripted model, PostgreSQL, Redis, Letta 0.16.4 (agents) and 0.11.7
(groups) as daemons, seeds them, and prints the ports and seeded ids as JSON on
stdout (progress goes to stderr). Running it again reuses what runs. `down` stops it all.
"""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from chatui.testbed.letta import RELEASES, Testbed, TestbedError


class Command(BaseCommand):
    help = "Bring the real-Letta testbed up, report on it, or take it down."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["up", "status", "down"])
        parser.add_argument("--llm-port", type=int, help="port for the scripted model (up)")
        parser.add_argument(
            "--release",
            action="append",
            choices=[release.version for release in RELEASES],
            help="bring up only this Letta release (up; repeatable)",
        )
        parser.add_argument("--json", dest="as_json", action="store_true", help="status as JSON")

    def handle(
        self,
        *args,
        action: str,
        llm_port: int | None,
        release: list[str] | None,
        as_json: bool,
        **options,
    ):
        testbed = Testbed(say=lambda message: self.stderr.write(message))
        try:
            if action == "up":
                self.up(testbed, llm_port, release)
            elif action == "status":
                self.status(testbed, as_json=as_json)
            else:
                stopped = testbed.down()
                self.stderr.write(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        except TestbedError as error:
            raise CommandError(str(error)) from error

    def up(self, testbed: Testbed, llm_port: int | None, versions: list[str] | None) -> None:
        releases = tuple(r for r in RELEASES if not versions or r.version in versions)
        state = testbed.up(llm_port=llm_port, releases=releases)
        self.stdout.write(dump(state))
        timings = state.get("timings", {})
        self.stderr.write(
            self.style.SUCCESS(f"testbed up in {timings.get('last_up_s')} s")
            + f"; state in {testbed.state_path}"
        )

    def status(self, testbed: Testbed, as_json: bool) -> None:
        report = testbed.status()
        if as_json:
            self.stdout.write(dump(report))
            return
        for name, part in report.items():
            where = part.get("url") or f"port {part.get('port')}"
            if not part["running"]:
                self.stdout.write(f"{name:14} stopped   {where}")
                continue
            health = "" if part.get("healthy", True) else "  NOT ANSWERING"
            self.stdout.write(f"{name:14} running   {where}  {part['rss_mb']:.0f} MB{health}")
            for kind in ("agents", "groups"):
                for label, ident in (part.get(kind) or {}).items():
                    self.stdout.write(f"{'':14}   {kind[:-1]} {label}: {ident}")


def dump(value: object) -> str:
    return json.dumps(value, indent=2)
