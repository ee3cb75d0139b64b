"""URLs of the outbox: the operations dashboard (behind the admin's login) and ``/metrics``.

Include them *before* the admin's own URLs, at the root of the project::

    urlpatterns = [
        path("", include("outbox.urls")),   # /admin/operations/ and /metrics
        path("admin/", admin.site.urls),
    ]
"""

from django.contrib import admin
from django.urls import path

from outbox.admin_views import operations_view
from outbox.views import metrics_view

urlpatterns = [
    path("admin/operations/", admin.site.admin_view(operations_view), name="operations"),
    path("metrics", metrics_view, name="metrics"),
]
