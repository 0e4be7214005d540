"""`manage.py grant_reviewer <username> [--revoke]`: let someone read every conversation
in the admin, and change nothing.

Reviewers are members of the "Reviewers" group, which holds exactly the view
permissions of chatui's models; staff status lets them into the admin. The group is
made (or brought up to date) by this command, so no data migration is needed.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError, CommandParser

GROUP_NAME = "Reviewers"


def reviewers_group() -> Group:
    """The Reviewers group, holding chatui's view permissions and nothing else."""
    group, _ = Group.objects.get_or_create(name=GROUP_NAME)
    view = Permission.objects.filter(content_type__app_label="chatui", codename__startswith="view_")
    if not view.exists():
        raise CommandError("chatui's permissions are missing: run `manage.py migrate` first.")
    group.permissions.set(view)
    return group


class Command(BaseCommand):
    help = "Make a user a reviewer (read-only admin access to every conversation), or stop."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--revoke", action="store_true", help="remove the user from the reviewers"
        )

    def handle(self, *args: Any, username: str, revoke: bool, **options: Any) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"No user named {username!r}.") from None
        group = reviewers_group()
        if revoke:
            user.groups.remove(group)
            # Staff status stays for those who still have another way to use the admin.
            keeps_admin = (
                user.is_superuser or user.groups.exists() or user.user_permissions.exists()
            )
            if user.is_staff and not keeps_admin:
                user.is_staff = False
                user.save(update_fields=["is_staff"])
            self.stdout.write(f"{username} is no longer a reviewer.")
            return
        user.groups.add(group)
        if not user.is_staff:
            user.is_staff = True
            user.save(update_fields=["is_staff"])
        self.stdout.write(f"{username} is a reviewer: they can read every conversation at /admin/.")
