from django.contrib import admin
from django.urls import include, path, reverse_lazy
from django.views.generic import RedirectView

admin.site.site_header = "Ticketing — outbox administration"
admin.site.site_title = "Ticketing admin"
admin.site.index_title = "Tickets, outbox and listeners"

urlpatterns = [
    # The example project has no site of its own: its front page is the admin.
    path("", RedirectView.as_view(url=reverse_lazy("admin:index")), name="home"),
    path("", include("outbox.urls")),  # /admin/operations/ and /metrics, before the admin's catch-all
    path("admin/", admin.site.urls),
]
