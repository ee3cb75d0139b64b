from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_the_front_page_is_not_a_404_it_redirects_to_the_admin(client, settings):
    settings.SECURE_SSL_REDIRECT = False
    response = client.get("/")
    assert (response.status_code, response["Location"]) == (302, "/admin/")
    # Logged out, the admin sends the visitor on to its login page.
    followed = client.get("/", follow=True)
    assert followed.status_code == 200
    assert followed.redirect_chain[-1][0].startswith("/admin/login/")
