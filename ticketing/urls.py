from django.contrib import admin
from django.urls import include, path

admin.site.site_header = "Ticketing — outbox administration"
admin.site.site_title = "Ticketing admin"
admin.site.index_title = "Tickets, outbox and listeners"

urlpatterns = [
    path("", include("outbox.urls")),  # /admin/operations/ and /metrics, before the admin's catch-all
    path("admin/", admin.site.urls),
]
